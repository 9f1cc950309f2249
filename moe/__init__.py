"""How tokens reach experts: the top-k router, token dispatch (and the expert-parallel
exchange), expert computation backends, and the MoE layer that composes them."""
