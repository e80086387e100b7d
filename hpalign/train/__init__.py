"""Training: the offline loop (DPO, KTO, CPO, ORPO, SimPO, RM, SFT) and its set-up."""


def run(cfg) -> int:
    """Train with a resolved, validated Config (imports DeepSpeed lazily)."""
    from hpalign.train.runner import run as run_training

    return run_training(cfg)
