"""Training: the dual-teacher meta-architecture, schedules, checkpoints and the loop."""
