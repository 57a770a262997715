"""The ONNX operators TensorRT's ONNX parser imports, as data (checked by ``m2f export check``).

Source: onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 (opsets 9..24). The 10.x
parsers add operators over the series; an op missing here may still import in a newer TensorRT, and one listed may
have failed in an older 10.x (GroupNormalization, LayerNormalization, Gelu landed during 10.x). Any op the parser
does not know is looked up as a plugin by its op_type (``plugin_version`` / ``plugin_namespace`` attributes,
defaults "1" / ""), which is how custom nodes such as ``MultiscaleDeformableAttnPlugin_TRT`` import.
"""
from __future__ import annotations

from .targets import OpSupport

TENSORRT_VERSION = "10.15"
OPSET_MIN, OPSET_MAX = 9, 24

SUPPORTED: frozenset[str] = frozenset(
    {
        "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
        "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
        "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv",
        "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand",
        "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool",
        "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU",
        "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler",
        "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
        "LogSoftmax", "Loop", "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
        "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
        "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
        "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
        "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RMSNormalization", "RNN", "RoiAlign",
        "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu",
        "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
        "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu",
        "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"
    }
)

UNSUPPORTED: frozenset[str] = frozenset(
    {
        "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
        "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
        "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
        "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
        "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
        "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
        "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"
    }
)

# Restrictions from the support matrix that a Mask2Former graph can run into.
RESTRICTIONS: dict[str, str] = {
    "AveragePool": "2D or 3D pooling only; dilations empty or all ones",
    "CumSum": "axis must be a build-time constant",
    "Dropout": "is_training must be an initializer that is False",
    "GridSample": "input must be 4D; FP32/FP16 only (no BF16)",
    "LayerNormalization": "only the first output Y",
    "MaxPool": "2D or 3D pooling only; no Indices output; dilations empty or all ones",
    "OneHot": "depth must be a build-time constant",
    "ReduceMax": "axes must be an initializer",
    "ReduceMean": "axes must be an initializer",
    "ReduceMin": "axes must be an initializer",
    "ReduceSum": "axes must be an initializer",
    "Resize": "modes nearest/linear; coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, asymmetric, align_corners; no antialiasing",
    "ScatterND": "reduction must be none",
    "Squeeze": "axes must resolve to a constant",
    "TopK": "sorted must be 1; K must be < 3840",
    "Unsqueeze": "axes must resolve to a constant",
}

SUPPORT = OpSupport(f"onnx-tensorrt docs/operators.md for TensorRT {TENSORRT_VERSION}", SUPPORTED, OPSET_MIN, OPSET_MAX,
                    RESTRICTIONS)
