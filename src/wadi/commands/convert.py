"""`wadi convert`: the authors' training outputs (LoRaD angles beside an unrotated UNet or
transformer) as a merged student that loads strict into the stock architecture."""

from __future__ import annotations

from pathlib import Path

from wadi.files.atomic import FORCE_HELP, check_new_file, check_out
from wadi.adapters.lorad import merge_angles
from wadi.files.weights import Weights, load_weights, read_file, save_weights
from wadi.models.backbones import DENOISER_SUBFOLDERS


def register(sub) -> None:
    p = sub.add_parser("convert", help="merge the authors' LoRaD angles (.pth) into their UNet/transformer",
                       description="The authors' training saves the student's angles (kduv.pth, ema_kduv.pth: "
                                   "<layer>.theta_a / .theta_b) and, as final/unet, the unrotated UNet with the "
                                   "angles among its tensors. This merges them into a plain model. .pth files "
                                   "are read with torch.load(weights_only=True): tensors only, no code runs.")
    p.add_argument("weights", help="the unrotated denoiser: the authors' final/unet (angles inside), or the base "
                                   "model's unet/ or transformer/ folder or pipeline folder")
    p.add_argument("--angles", type=Path, help="angles file (kduv.pth, ema_kduv.pth or .safetensors); default: "
                                               "the angles inside WEIGHTS")
    p.add_argument("--out", type=Path, required=True,
                   help="a diffusers model folder to write, or FILE.safetensors (the authors' released layout)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP + "; a FILE.safetensors --out is replaced")
    p.set_defaults(func=run)


def run(args) -> int:
    flat = args.out.suffix == ".safetensors"
    if flat:
        check_new_file(args.out, args.force, inputs=[args.weights, args.angles])
    else:
        check_out(args.out, args.force, inputs=[args.weights, args.angles])
    base = load_weights(args.weights, subfolders=DENOISER_SUBFOLDERS)
    angles = read_file(args.angles) if args.angles else base.state_dict
    merged = merge_angles(base.state_dict, angles)
    like = Weights(merged, base.path, None if flat else base.model_dir)
    if not flat and like.model_dir is None:
        raise ValueError(f"{args.weights} is a single file: give --out FILE.safetensors")
    written = save_weights(merged, args.out.with_suffix("") if flat else args.out, like)
    print(f"wrote {written} ({sum(k.endswith('.theta_a') for k in angles)} rotated layers)")
    return 0
