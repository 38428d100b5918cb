"""finetune-trainer: transfer learning on Ray Train; also the typed FineTuneJob spec shared with the operator."""
