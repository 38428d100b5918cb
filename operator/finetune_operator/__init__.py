"""finetune-operator: reconciles FineTuneJob resources into Ray Train clusters (kopf)."""
