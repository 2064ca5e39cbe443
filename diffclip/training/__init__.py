"""Contrastive training of DiffCLIP (`diffclip train`): data, optimiser and schedule, checkpoints, the loop.

One module per job: `data` (CSV), `wds` (webdataset shards), `samples` (decoding shared by both), `optim`,
`checkpoint_io`, `loop`, `monitor` (progress bar, log.jsonl, TensorBoard), `validate`.
"""
