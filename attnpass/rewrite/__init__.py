"""Rewrites that turn a found attention site into SSMax or a fused online-softmax op, one subpackage per IR."""
