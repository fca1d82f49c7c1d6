"""The torch.fx passes of atofx: tracing, channel dependency, ZIG inference, FLOPs."""
