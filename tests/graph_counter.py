"""A torch.compile backend that counts the graphs it is given, for the compile-once tests."""


class GraphCounter:
    """AOTAutograd backend that runs the traced graphs and counts the forward graphs."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.forward_graphs = 0

        def forward_compiler(gm, example_inputs):
            self.forward_graphs += 1
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(
            fw_compiler=forward_compiler, bw_compiler=lambda gm, ex: make_boxed_func(gm.forward)
        )
