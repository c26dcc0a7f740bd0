"""`lipsync import-synctalk`'s work: a SyncTalk-2D training run's checkpoints read without
PyTorch, its crop rectangles from landmarks, and the model folder and config entry written."""
