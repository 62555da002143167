"""Making and using task models: fine-tuning an encoder on a task (a classification head or a 2D UNETR), the model
folder people keep, prediction on images, DICOM series and NIfTI volumes, features of any encoder, LoRA adapters, and
the metrics of a task."""
