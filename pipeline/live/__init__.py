"""Distillation families that need the teacher live in the training process (feature, attention, relation):
`capture` reads a model's inner states, `losses` holds the pure loss functions, `plan` resolves the layer pairs,
`teacher` loads the teacher and builds the loss sums the train loop adds to the top-k loss."""
