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

# The common overrides of a tiny campaign plan (tests of cm-policy campaign).
TINY_CAMPAIGN = [
    "model=unet_tiny",
    "model.down_dims=[16,32]",
    "model.time_embed_dim=16",
    "training.batch_size=8",
    "training.warmup_steps=1",
    "training.log_every=1",
    "training.lr_schedule=constant",  # the anytime schedule: marks can be appended
]

# A tiny keypoints policy for the server's tests (random weights: the server does not care).
SERVE_SPEC = {
    "task": {
        "env": "pusht",
        "obs_type": "keypoints",
        "name": "pusht_keypoints",
        "action_dim": 2,
        "low_dim": {"keypoints": 20},
        "image_keys": [],
    },
    "horizon": 16,
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "model": {"down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "time_embed_dim": 16},
    "method": {"name": "isd"},
}
