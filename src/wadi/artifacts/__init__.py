"""What a run leaves and how it is used: students, exports, LoRA and single-file writers, cards."""
