"""Independent numpy oracle for big_vision's CLIPPO one-tower forward pass.

Written from big_vision/models/vit.py (_Model, Encoder, Encoder1DBlock, MlpBlock,
MAPHead) and big_vision/models/proj/clippo/one_tower.py, plus Flax defaults
(LayerNorm eps=1e-6, nn.gelu approximate=True, attention q/sqrt(head_dim)).
All math runs in float64 directly on the Flax (in, heads, head_dim) layouts.
"""
import numpy as np

P = "params/img/"
LN_EPS = 1e-6


def make_params(width, depth, heads, mlp_dim, patch, image_size, embed_dim, seed=0):
    rng = np.random.default_rng(seed)
    hd = width // heads
    n_tok = (image_size // patch) ** 2
    p = {}

    def w(key, shape, fan_in):
        p[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def b(key, shape, s=0.1):
        p[key] = (s * rng.standard_normal(shape)).astype(np.float32)

    def ln(pre):
        p[pre + "/scale"] = (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        b(pre + "/bias", (width,))

    def mha(pre):
        for n in ("query", "key", "value"):
            w(f"{pre}/{n}/kernel", (width, heads, hd), width)
            b(f"{pre}/{n}/bias", (heads, hd))
        w(pre + "/out/kernel", (heads, hd, width), width)
        b(pre + "/out/bias", (width,))

    def mlp(pre):
        w(pre + "/Dense_0/kernel", (width, mlp_dim), width)
        b(pre + "/Dense_0/bias", (mlp_dim,))
        w(pre + "/Dense_1/kernel", (mlp_dim, width), mlp_dim)
        b(pre + "/Dense_1/bias", (width,))

    w(P + "embedding/kernel", (patch, patch, 3, width), patch * patch * 3)
    b(P + "embedding/bias", (width,))
    b(P + "pos_embedding", (1, n_tok, width), s=1 / np.sqrt(width))
    for i in range(depth):
        blk = f"{P}Transformer/encoderblock_{i}/"
        ln(blk + "LayerNorm_0")
        mha(blk + "MultiHeadDotProductAttention_0")
        ln(blk + "LayerNorm_1")
        mlp(blk + "MlpBlock_0")
    ln(P + "Transformer/encoder_norm")
    b(P + "MAPHead_0/probe", (1, 1, width), s=1.0)
    mha(P + "MAPHead_0/MultiHeadDotProductAttention_0")
    ln(P + "MAPHead_0/LayerNorm_0")
    mlp(P + "MAPHead_0/MlpBlock_0")
    w(P + "head/kernel", (width, embed_dim), width)
    b(P + "head/bias", (embed_dim,))
    p["params/t"] = np.array([np.log(10.0)], np.float32)
    # A few optimizer-state entries, as found in real big_vision checkpoints.
    p["opt/0/mu/img/head/kernel"] = np.zeros((width, embed_dim), np.float32)
    p["opt/0/mu/img/head/bias"] = np.zeros((embed_dim,), np.float32)
    p["opt/0/nu/img/head/bias"] = np.ones((embed_dim,), np.float32)
    p["opt/0/count"] = np.array(7, np.int32)
    return p


def _layernorm(x, pre, prm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + LN_EPS) * prm[pre + "/scale"] + prm[pre + "/bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _mlp(x, pre, prm):
    h = x @ prm[pre + "/Dense_0/kernel"] + prm[pre + "/Dense_0/bias"]
    return _gelu_tanh(h) @ prm[pre + "/Dense_1/kernel"] + prm[pre + "/Dense_1/bias"]


def _mha(xq, xkv, pre, prm):
    """Flax MultiHeadDotProductAttention, on (in, heads, head_dim) kernels."""
    q = np.einsum("nqc,chd->nqhd", xq, prm[pre + "/query/kernel"]) + prm[pre + "/query/bias"]
    k = np.einsum("nkc,chd->nkhd", xkv, prm[pre + "/key/kernel"]) + prm[pre + "/key/bias"]
    v = np.einsum("nkc,chd->nkhd", xkv, prm[pre + "/value/kernel"]) + prm[pre + "/value/bias"]
    q = q / np.sqrt(q.shape[-1])
    logits = np.einsum("nqhd,nkhd->nhqk", q, k)
    logits = logits - logits.max(-1, keepdims=True)
    a = np.exp(logits)
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("nhqk,nkhd->nqhd", a, v)
    return np.einsum("nqhd,hdc->nqc", o, prm[pre + "/out/kernel"]) + prm[pre + "/out/bias"]


def forward(params, images):
    """images: (N,H,W,3) in [-1,1]. Returns L2-normalised embeddings (float64)."""
    prm = {k: np.asarray(v, np.float64) for k, v in params.items() if k.startswith("params/")}
    x = np.asarray(images, np.float64)
    kern = prm[P + "embedding/kernel"]                       # (ph, pw, 3, D) HWIO
    ph, pw, _, D = kern.shape
    n, H, W, C = x.shape
    gh, gw = H // ph, W // pw
    # Conv with stride == kernel size, VALID padding (cross-correlation, no flip).
    x = x[:, :gh * ph, :gw * pw].reshape(n, gh, ph, gw, pw, C)
    x = np.einsum("nhiwjc,ijcd->nhwd", x, kern) + prm[P + "embedding/bias"]
    x = x.reshape(n, gh * gw, D) + prm[P + "pos_embedding"]   # row-major, no cls
    depth = sum(1 for k in prm if k.startswith(P + "Transformer/encoderblock_")
                and k.endswith("LayerNorm_0/scale"))
    for i in range(depth):
        blk = f"{P}Transformer/encoderblock_{i}/"
        y = _layernorm(x, blk + "LayerNorm_0", prm)
        x = x + _mha(y, y, blk + "MultiHeadDotProductAttention_0", prm)
        x = x + _mlp(_layernorm(x, blk + "LayerNorm_1", prm), blk + "MlpBlock_0", prm)
    x = _layernorm(x, P + "Transformer/encoder_norm", prm)
    # MAPHead: probe attends over tokens; x = x + MLP(LN(x)); take token 0.
    m = P + "MAPHead_0/"
    probe = np.broadcast_to(prm[m + "probe"], (n, 1, D))
    x = _mha(probe, x, m + "MultiHeadDotProductAttention_0", prm)
    x = x + _mlp(_layernorm(x, m + "LayerNorm_0", prm), m + "MlpBlock_0", prm)
    x = x[:, 0]
    z = x @ prm[P + "head/kernel"] + prm[P + "head/bias"]
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-8)


def logit_scale(params):
    return float(np.exp(np.asarray(params["params/t"], np.float64)[0]))


def save_npz(params, path):
    np.savez(path, **params)


if __name__ == "__main__":
    prm = make_params(32, 2, 2, 64, 8, 32, 16, seed=0)
    imgs = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    z = forward(prm, imgs)
    print("n params keys:", len(prm), "pos_embedding", prm[P + "pos_embedding"].shape)
    print("embeddings", z.shape, z.dtype, "norms", np.linalg.norm(z, axis=1))
    assert z.shape == (3, 16) and np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    print("logit_scale", logit_scale(prm))
    save_npz(prm, "/tmp/review_bv/tiny_clippo.npz")
    back = dict(np.load("/tmp/review_bv/tiny_clippo.npz"))
    assert np.allclose(forward(back, imgs), z)
    print("OK")
