"""Data pipelines: WebDataset shard writers (``python -m data_pipelines write``), manifest verification, a dataset
checker, and an exactly resumable loader (:func:`data_pipelines.loader.build_loader`)."""
