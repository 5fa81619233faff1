"""The jobs layer: one module per launcher in launch/."""
