"""Front ends: each gets the weight ops of a model in its own way.

- :mod:`.fx_trace`: torch.fx symbolic tracing (with timm's and torchvision's FX registries),
  giving a graph that :mod:`pfa_fx.rewrite` rewrites;
- :mod:`.intercept`: run-time interception of weight ops inside code a graph keeps opaque;
- :mod:`.export`: torch.export's training IR, rewritten by the same pass;
- :mod:`.eager`: the last fallback, a model's whole forward run under interception;
- :mod:`.modules`: the model's module tree kept, each weight op run feedback-aware in
  the forward of the module owning it, its state a child of that module (FSDP2).
"""
