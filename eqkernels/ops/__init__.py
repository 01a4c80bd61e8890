"""One module per op family: schema, fake impl, dispatch, autograd and the `_ref`."""
