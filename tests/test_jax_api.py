"""The model inside a user's own JAX code (README: "Inside your JAX code"): the stages as
functions of jax arrays under the user's `jit` and `grad`, composed with optax. (Under a
user's `shard_map` on 8 devices: tests/test_sharding.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import max_rel_err
from flax import nnx
from torch_reference import TorchCde

import cde_jax

TEXTS = ["search_query: the cat sat on the mat", "search_query: cats and dogs",
         "search_query: stock markets fell today", "search_query: a rally in bond prices",
         "search_query: kittens purr", "search_query: interest rates rose"]


@pytest.fixture(scope="module")
def setup(synthetic, random_docs):
    released, converted = synthetic()
    model = cde_jax.load(converted)
    ids, mask = model.tokenizer(TEXTS)
    dataset = model.embed_minicorpus(random_docs[:16], batch_size=8)
    return model, released, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dataset)


def test_a_jitted_step_trains_a_head_on_frozen_cde_embeddings(setup):
    """A user's classifier on top of frozen cde embeddings: their own jitted optax step."""
    model, _, ids, mask, dataset = setup
    graphdef, frozen = model.graphdef, model.params
    labels = jnp.array([0, 0, 1, 1, 0, 1])

    def embed(params, ids, mask):
        return nnx.merge(graphdef, params).second_stage(ids, mask, dataset)

    def loss_fn(head, ids, mask, labels):
        features = jax.lax.stop_gradient(embed(frozen, ids, mask))
        logits = features @ head["w"] + head["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    optimizer = optax.adam(0.05)

    @jax.jit
    def step(head, opt_state, ids, mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(head, ids, mask, labels)
        updates, opt_state = optimizer.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    head = {"w": jnp.zeros((model.hidden_size, 2)), "b": jnp.zeros(2)}
    opt_state = optimizer.init(head)
    losses = []
    for _ in range(40):
        head, opt_state, loss = step(head, opt_state, ids, mask, labels)
        losses.append(float(loss))
    print(f"head loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert losses[-1] < 0.05 * losses[0]
    # The embeddings inside the user's jit are the model's own.
    err = max_rel_err(jax.jit(embed)(frozen, ids, mask),
                      model.second_stage(np.asarray(ids), np.asarray(mask), np.asarray(dataset)))
    assert err <= 1e-5


def test_gradients_wrt_parameters_and_dataset_embeddings_match_torch(setup):
    model, released, ids, mask, dataset = setup
    graphdef, params = model.graphdef, model.params
    weights_bd = jax.random.normal(jax.random.key(0), (len(TEXTS), model.hidden_size))

    def objective(params, dataset_md):
        out_bd = nnx.merge(graphdef, params).second_stage(ids, mask, dataset_md)
        return (out_bd * weights_bd).sum()

    g_params, g_dataset = jax.jit(jax.grad(objective, argnums=(0, 1)))(params, dataset)

    ref = TorchCde(released)
    dataset_t = torch.tensor(np.asarray(dataset), requires_grad=True)
    out = ref.second_stage_tensor(np.array(ids), np.array(mask), dataset_t)
    (out * torch.tensor(np.asarray(weights_bd))).sum().backward()
    err_dataset = max_rel_err(g_dataset, dataset_t.grad.numpy())
    kernel = g_params["second_stage_model"]["output_projection"]["fc1"]["kernel"]
    err_kernel = max_rel_err(kernel, ref.output_projection[0].weight.grad.numpy().T)
    print(f"grad wrt dataset embeddings {err_dataset:.2e}, wrt a kernel {err_kernel:.2e}")
    assert float(jnp.abs(g_dataset).max()) > 0
    assert err_dataset <= 1e-5 and err_kernel <= 1e-5
