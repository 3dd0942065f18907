"""Emitters: turn ``passes.plan.Plan``s into IR.  They read plans and decide nothing about masks or ``n``."""
