"""Free evolution: circuits tracked over a fine-tuning checkpoint series (distance, stability, conflict)."""
