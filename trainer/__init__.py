"""The learning path: logged conversations -> dataset -> Trainer -> gated new model version."""
