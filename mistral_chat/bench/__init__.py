"""`mistral-chat bench`: the engine's speed on random weights of real model shapes, next to the floor and HF."""
