// TensorRT IPluginV3 for fused entropy attention ("EntropyAttention", namespace "fastardiff", version "1").
//
// Inputs   q [B,H,K,Dh], k [B,H,T,Dh], v [B,H,T,Dh]  (fp32, fp16 or bf16, all the same type, linear format)
//          lengths [B]  int32 or int64 (the ONNX graph carries int64; both are accepted, nothing is cast)
// Outputs  out [B,H,K,Dh] and entropy [B,H,K], both in q's type.
// Fields   scale (float32; <= 0 means 1/sqrt(Dh)), normalize (int32; != 0 divides the entropy by log n_i),
//          in_buffer (int32 0/1, default 0; 1: k/v are a cache buffer holding the new tokens at each row's
//          length, row b's query i sees keys j <= lengths[b] + i).
// The cache length causal_offset = T - K is not a field: it is read from the input shapes at enqueue, so one
// engine serves every cache length of its optimisation profile.
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace fastardiff {

constexpr char const* kEntropyAttentionName = "EntropyAttention";
constexpr char const* kEntropyAttentionVersion = "1";
constexpr char const* kEntropyAttentionNamespace = "fastardiff";

class EntropyAttentionPlugin : public nvinfer1::IPluginV3,
                               public nvinfer1::IPluginV3OneCore,
                               public nvinfer1::IPluginV3OneBuild,
                               public nvinfer1::IPluginV3OneRuntime {
public:
    EntropyAttentionPlugin(float scale, int32_t normalize, int32_t inBuffer = 0);
    ~EntropyAttentionPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs,
                            int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    float scale() const { return mScale; }
    int32_t normalize() const { return mNormalize; }
    int32_t inBuffer() const { return mInBuffer; }

private:
    float mScale;
    int32_t mNormalize;
    int32_t mInBuffer;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class EntropyAttentionCreator : public nvinfer1::IPluginCreatorV3One {
public:
    EntropyAttentionCreator();
    ~EntropyAttentionCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Reads scale / normalize / in_buffer from a field collection (float32 or float64 scale; int32, int64 or int8
// normalize and in_buffer). Returns false and fills `error` for a field of the right name but an unusable type or
// length, or an in_buffer other than 0/1.
bool parseEntropyAttentionFields(nvinfer1::PluginFieldCollection const* fc, float* scale, int32_t* normalize,
                                 int32_t* inBuffer, std::string* error);

}  // namespace fastardiff

// Entry points TensorRT looks up when it loads the library dynamically
// (IPluginRegistry::loadLibrary, trt.get_plugin_registry().load_library, trtexec --dynamicPlugins).
extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
