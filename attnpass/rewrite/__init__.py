"""Emitters: turn ``passes.plan.Plan``s into IR, one module or subpackage per IR (fx, onnx/, mlir/).

They read plans and decide nothing about masks or ``n``.
"""
