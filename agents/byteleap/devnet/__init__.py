"""The one-box devnet: a devnet chain, a validator, miners and workers as local processes."""
