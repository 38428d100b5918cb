"""Dev cluster add-ons started next to the real control plane (Kueue today)."""
