"""How models are adapted: LoRaD, peft's LoRA/DoRA, full fine-tuning, their target layers and files."""
