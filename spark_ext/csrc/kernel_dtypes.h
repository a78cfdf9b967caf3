// The element dtypes every spark_ext kernel takes, and the one dtype switch
// the CPU and CUDA sources share.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda (the trailing argument) with `scalar_t` bound to float,
// at::Half or at::BFloat16. The entry points check the dtype first with a
// TypeError naming the argument, so ATen's "not implemented for" error of
// another dtype is never what a user sees; no double kernels are instantiated.
#define SPARK_DISPATCH_KERNEL_DTYPES(TYPE, NAME, ...)                                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                    \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
