"""The noise processes against independent transcriptions of their formulas (docs/method.md,
sections 3 and 4): schedules computed here in float64 from their definitions, the forward
processes the generators invert, oracles that predict the true eps / v / velocity, the
gradient VSD is defined by, and the stock diffusers schedulers an export ships."""

import numpy as np
import pytest
import torch

from wadi.engine.losses import vsd_loss
from wadi.models.process import VP, Flow, process_of

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW_SCHEDULE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def sd_abar(t: int) -> float:
    """abar_t of Stable Diffusion's schedule: betas linear in sqrt from 0.00085 to 0.012."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1 - betas)[t])


def batch(seed=0, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --- which process -------------------------------------------------------------------

def test_the_scheduler_config_says_which_process():
    assert isinstance(process_of({**SD_SCHEDULE, "_class_name": "PNDMScheduler"}), VP)
    assert isinstance(process_of(FLOW_SCHEDULE), Flow)
    sana = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
            "use_flow_sigmas": True, "flow_shift": 3.0}
    assert isinstance(process_of(sana), Flow) and process_of(sana).shift == 3.0
    with pytest.raises(ValueError, match="one_step_abar"):  # a VP-only setting on a flow model
        process_of(FLOW_SCHEDULE, 0.0047)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        process_of({**FLOW_SCHEDULE, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="sample"):
        process_of(FLOW_SCHEDULE).sampler("ddim")


# --- VP --------------------------------------------------------------------------------

def test_vp_coefficients_follow_the_schedule():
    vp = VP(SD_SCHEDULE)
    t = torch.tensor([0, 499, 999])
    alpha, sigma = vp.coefficients(t)
    expected = torch.tensor([sd_abar(i) for i in (0, 499, 999)])
    torch.testing.assert_close(alpha.flatten() ** 2, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha))
    x0, eps = batch()
    torch.testing.assert_close(vp.add_noise(x0, eps, t), alpha * x0 + sigma * eps)


def test_vp_generator_inverts_the_forward_process_at_its_constant():
    vp = VP(SD_SCHEDULE)  # the authors' 0.0047, not the schedule's 0.00466
    assert vp.one_step_abar == 0.0047 and abs(VP(SD_SCHEDULE, "scheduler").one_step_abar - sd_abar(999)) < 1e-7
    x0, eps = batch()
    z = 0.0047 ** 0.5 * x0 + (1 - 0.0047) ** 0.5 * eps
    torch.testing.assert_close(vp.generate(eps, z), x0, rtol=1e-4, atol=1e-4)


def test_vp_v_prediction_converts_to_eps_and_trains_on_v():
    vp = VP({**SD_SCHEDULE, "prediction_type": "v_prediction"})
    x0, eps = batch()
    t = torch.tensor([999, 300, 3])
    a = torch.tensor([sd_abar(i) for i in (999, 300, 3)]).sqrt().view(-1, 1, 1, 1)
    s = (1 - a ** 2).sqrt()
    v = a * eps - s * x0
    torch.testing.assert_close(vp.target(x0, eps, t), v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vp.to_work(v, a * x0 + s * eps, t), eps, rtol=1e-4, atol=1e-4)


def test_vp_score_difference_weighting_and_fake_loss():
    vp = VP(SD_SCHEDULE)
    real, fake = batch(1)
    t = torch.tensor([10, 500, 990])
    sigma2 = torch.tensor([1 - sd_abar(i) for i in (10, 500, 990)]).view(-1, 1, 1, 1)
    x0 = torch.zeros_like(real, requires_grad=True)
    vsd_loss(x0, vp.score_difference(real, fake, t)).backward()
    torch.testing.assert_close(x0.grad, sigma2.float() * (real - fake) / x0.numel(), rtol=1e-5, atol=1e-9)
    # eps_pred misses eps by 2 in one of four elements; alpha^2 weighs the square
    pred, eps = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]]), torch.zeros(1, 1, 2, 2)
    torch.testing.assert_close(vp.fake_loss(pred, None, eps, torch.tensor([500])),
                               torch.tensor(sd_abar(500) * 4 / 4, dtype=torch.float32))


# --- rectified flow ------------------------------------------------------------------------

def test_flow_time_is_the_training_schedulers_shifted_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = Flow(FLOW_SCHEDULE)
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    index = torch.arange(1000)
    # the stock scheduler lists its training timesteps from the noisiest (index 999) down
    torch.testing.assert_close(flow.time(index), stock.timesteps.flip(0).float(), rtol=1e-6, atol=1e-3)
    u = (index.double() + 1) / 1000
    torch.testing.assert_close(flow.time(index).double() / 1000, 3 * u / (1 + 2 * u), rtol=1e-6, atol=1e-6)
    assert flow.time(torch.tensor([flow.num_train_timesteps - 1])).item() == 1000.0  # s = 1: pure noise


def test_flow_forward_process_predictions_and_generator():
    flow = Flow(FLOW_SCHEDULE)
    x0, eps = batch(2)
    t = flow.time(torch.tensor([999, 400, 20]))
    s = (t / 1000).view(-1, 1, 1, 1)
    x_t = flow.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    v = eps - x0  # the true velocity
    torch.testing.assert_close(flow.target(x0, eps, t), v)
    torch.testing.assert_close(x_t - s * flow.to_work(v, x_t, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow.generate(v, eps), x0)  # at s = 1 the input is pure noise: x0 = z - v


def test_flow_score_difference_is_sigma_squared_eps_difference():
    """g = sigma^2 (eps_real - eps_fake), the VP convention, with eps read off each velocity
    through x0 = x_t - s v and eps = (x_t - (1 - s) x0) / s."""
    flow = Flow(FLOW_SCHEDULE)
    v_real, v_fake = batch(3)
    x_t = batch(4)[0]
    t = flow.time(torch.tensor([50, 500, 950]))
    s = (t.double() / 1000).view(-1, 1, 1, 1)

    def eps_of(v):
        x0 = x_t.double() - s * v.double()
        return (x_t.double() - (1 - s) * x0) / s

    expected = (s ** 2 * (eps_of(v_real) - eps_of(v_fake))).float()
    torch.testing.assert_close(flow.score_difference(v_real, v_fake, t), expected, rtol=1e-4, atol=1e-5)


def test_flow_fake_loss_is_flow_matching():
    flow = Flow(FLOW_SCHEDULE)
    x0, eps = batch(5)
    t = flow.time(torch.tensor([10, 500, 999]))
    torch.testing.assert_close(flow.fake_loss(eps - x0, x0, eps, t), torch.tensor(0.0))
    torch.testing.assert_close(flow.fake_loss(eps - x0 + 2, x0, eps, t), torch.tensor(4.0))


def test_flow_one_step_scheduler_lands_on_the_generator_bit_for_bit():
    flow = Flow(FLOW_SCHEDULE)
    sched = flow.one_step_scheduler()
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [1000.0]
    z, v = batch(6)
    out = sched.step(v, sched.timesteps[0], z).prev_sample
    assert torch.equal(out, flow.generate(v, z))


def test_vp_one_step_scheduler_lands_on_the_generator():
    vp = VP(SD_SCHEDULE)
    sched = vp.one_step_scheduler()
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]
    assert sched.alphas_cumprod[-1] == torch.tensor(0.0047)
    z, eps = batch(7)
    torch.testing.assert_close(sched.step(eps, 999, z).prev_sample, vp.generate(eps, z), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["euler", "dpm"])
def test_flow_samplers_recover_a_point_mass(name):
    """With the exact velocity of a single image (v = (x_t - x0) / s), every sampler must
    land on that image from any noise."""
    flow = Flow(FLOW_SCHEDULE)
    sched = flow.sampler(name)
    sched.set_timesteps(8)
    x0 = batch(8)[0]
    x = batch(9)[0]
    for i, t in enumerate(sched.timesteps):  # DPM rounds its timesteps: its sigmas are exact
        x = sched.step((x - x0) / sched.sigmas[i], t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)
