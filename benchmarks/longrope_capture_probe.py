"""Does a longrope base's step capture as a CUDA graph on this transformers, and is it right?"""
import tempfile, torch, transformers
from kvpred.model import KVPredictionModel
from kvpred.testing import save_tiny_model
print("transformers", transformers.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
path = save_tiny_model(tempfile.mkdtemp(), rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
    "short_factor": [1.0] * 8, "long_factor": [4.0] * 8})
model = KVPredictionModel.from_pretrained(str(path), keep_ratio=1.0, device="cuda")
for n, tail in ((20, 1), (32, 3), (40, 1), (40, 3), (60, 3)):
    ids = torch.randint(3, 259, (2, n), generator=torch.Generator().manual_seed(n)).cuda()
    exact = model.generate(ids, mode="exact", max_new_tokens=8)
    same = [torch.equal(model.generate(ids, mode="predicted", exact_tail=tail, max_new_tokens=8), exact)
            for _ in range(2)]
    steps = {key: (type(p.step).__name__, getattr(p.step, "graph", None) is not None)
             for key, p in model._steps.entries.items()}
    print(f"n={n} tail={tail}: predicted == exact {same}; steps {steps}")
