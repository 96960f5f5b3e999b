"""quipc/frontend/onnx_rewrite.py: pruning the nodes a rewrite left dead."""
from onnx import TensorProto, helper

from quipc.frontend.onnx_rewrite import _prune


def _branch(name):
    """A subgraph with no inputs of its own that reads the outer-scope tensor `t`."""
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
    return helper.make_graph([helper.make_node("Identity", ["t"], [f"{name}_y"])], name, [], [out])


def test_prune_keeps_what_only_a_subgraph_reads():
    feeds_branch = helper.make_node("Relu", ["x"], ["t"])            # read only inside the If's branches
    dead = helper.make_node("Neg", ["x"], ["unused"])                # read by nothing
    cond = helper.make_node("If", ["c"], ["y"], then_branch=_branch("then"), else_branch=_branch("else"))
    kept = _prune([feeds_branch, dead, cond], {"y"})
    assert [n.op_type for n in kept] == ["Relu", "If"]
