"""Run by a side virtualenv's python that has sae-lens installed (see .ci/run):
load a SAELens folder, encode and decode x.npy, write f.npy, xhat.npy (decode) and out.npy (forward,
which includes a skip-transcoder's skip term) beside it; prints the loaded class's name."""
import sys

import numpy as np
import torch
from sae_lens import SAE

folder, work = sys.argv[1], sys.argv[2]
sae = SAE.load_from_disk(folder, device="cpu")
x = torch.from_numpy(np.load(f"{work}/x.npy"))
with torch.no_grad():
    f = sae.encode(x)
    np.save(f"{work}/f.npy", f.numpy())
    np.save(f"{work}/xhat.npy", sae.decode(f).numpy())
    np.save(f"{work}/out.npy", sae(x).numpy())
print(type(sae).__name__)
