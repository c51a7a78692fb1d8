"""The conformance suite: an independent reference implementation and the checks that every
backend gives the same probabilities, losses and gradients."""
