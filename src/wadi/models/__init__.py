"""What models are: the backbone registry, conditioning, the noise process, sampling."""
