"""Config overrides for training runs small enough for tests (shared by the test files)."""

TINY = [
    "model=unet_tiny",
    "model.down_dims=[16,32]",
    "model.time_embed_dim=16",
    "training.batch_size=16",
    "training.log_every=1",
    "training.warmup_steps=2",
    "training.num_threads=1",
    # No closed-loop evaluation unless a test asks for one (training.eval_every=N, or 0 for the
    # default: once at the end of training).
    "training.eval_every=null",
    "eval.n_episodes=2",
    "eval.max_steps=16",
    "eval.n_envs=1",
    "eval.n_videos=1",
    "eval.progress=false",
]
