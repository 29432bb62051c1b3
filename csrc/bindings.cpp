// pybind11 bindings of mmkernels._C: the CUDA kernels of csrc/, driven from
// mmkernels/ops/region/launch.py (region_mask and masked_region_loss).
// Arguments are device pointers and strides (integers), so the module needs no libtorch.
#include <pybind11/pybind11.h>

#include "region.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmkernels CUDA kernels (region masking, masked region losses); see csrc/region.h";
  m.def("region_mask_forward", &mmkernels::region_mask_forward, py::arg("feats"),
        py::arg("stride_fb"), py::arg("stride_fr"), py::arg("out"), py::arg("lens"),
        py::arg("valid"), py::arg("stride_vb"), py::arg("stride_vr"), py::arg("flat_cum"),
        py::arg("emb"), py::arg("mask"), py::arg("source"), py::arg("batch"), py::arg("regions"),
        py::arg("dim"), py::arg("dtype"), py::arg("seed0"), py::arg("key_select"),
        py::arg("key_action"), py::arg("key_source"), py::arg("select_below"),
        py::arg("min_masked"), py::arg("mask_below"), py::arg("random_below"), py::arg("bert"),
        py::arg("device"), py::arg("stream"));
  m.def("region_mask_backward", &mmkernels::region_mask_backward, py::arg("grad_out"),
        py::arg("stride_gb"), py::arg("stride_gr"), py::arg("source"), py::arg("grad_in"),
        py::arg("emb_partial"), py::arg("batch"), py::arg("regions"), py::arg("dim"),
        py::arg("dtype"), py::arg("bert"), py::arg("device"), py::arg("stream"));
  m.def("masked_region_loss_forward", &mmkernels::masked_region_loss_forward, py::arg("pred"),
        py::arg("stride_pb"), py::arg("stride_pr"), py::arg("target"), py::arg("stride_tb"),
        py::arg("stride_tr"), py::arg("mask"), py::arg("stride_mb"), py::arg("stride_mr"),
        py::arg("loss"), py::arg("stats"), py::arg("batch"), py::arg("regions"), py::arg("dim"),
        py::arg("dtype"), py::arg("kind"), py::arg("beta"), py::arg("device"), py::arg("stream"));
  m.def("masked_region_loss_backward", &mmkernels::masked_region_loss_backward,
        py::arg("grad_loss"), py::arg("stride_gb"), py::arg("stride_gr"), py::arg("pred"),
        py::arg("stride_pb"), py::arg("stride_pr"), py::arg("target"), py::arg("stride_tb"),
        py::arg("stride_tr"), py::arg("mask"), py::arg("stride_mb"), py::arg("stride_mr"),
        py::arg("stats"), py::arg("grad_pred"), py::arg("grad_target"), py::arg("batch"),
        py::arg("regions"), py::arg("dim"), py::arg("dtype"), py::arg("kind"), py::arg("beta"),
        py::arg("device"), py::arg("stream"));
}
