// conv_bias_act's float32 kernels (one translation unit per dtype: see conv_launch.cuh).
#include "conv_launch.cuh"

RESNET_FUSED_CONV_KERNELS(float)
