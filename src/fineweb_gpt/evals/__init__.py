"""What a model learned, beyond its loss: HellaSwag standalone (fineweb-gpt-eval task=hellaswag)
and during training (in_training.HellaSwagCallback)."""
