"""The ML meaning the trainer, the model server and the workflow must share, in the kernel so
that none of them keeps its own copy: the deterministic train/validation/test split
(`split`), the standardisation fitted on the training rows (`preprocessing`) and the model
card stored beside every artifact's weights (`card`). No topics here."""
