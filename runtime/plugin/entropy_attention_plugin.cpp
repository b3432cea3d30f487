// TensorRT IPluginV3 (core + build + runtime capabilities) and IPluginCreatorV3One for fused entropy attention.
// The kernel behind enqueue() is the C ABI in entropy_attention_kernel.h. See entropy_attention_plugin.h.
#include "entropy_attention_plugin.h"

#include "entropy_attention_kernel.h"

#include <cmath>
#include <cstring>
#include <mutex>

using namespace nvinfer1;

namespace fastardiff {
namespace {

constexpr int32_t kNbInputs = 4;   // q, k, v, lengths
constexpr int32_t kNbOutputs = 2;  // out, entropy

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& msg) noexcept {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    std::string line = std::string("fastardiff EntropyAttention: ") + msg;
    if (logger) {
        logger->log(ILogger::Severity::kERROR, line.c_str());
    } else {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

// One integer value of an int32 / int64 / int8 field; false for another type or length.
bool readIntField(PluginField const& field, int64_t* value) {
    if (field.length != 1) return false;
    switch (field.type) {
        case PluginFieldType::kINT32: *value = *static_cast<int32_t const*>(field.data); return true;
        case PluginFieldType::kINT64: *value = *static_cast<int64_t const*>(field.data); return true;
        case PluginFieldType::kINT8: *value = *static_cast<int8_t const*>(field.data); return true;
        default: return false;
    }
}

bool isFloatType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

int toKernelDtype(DataType t) {
    switch (t) {
        case DataType::kFLOAT: return FASTARDIFF_FLOAT32;
        case DataType::kHALF: return FASTARDIFF_FLOAT16;
        case DataType::kBF16: return FASTARDIFF_BFLOAT16;
        default: return -1;
    }
}

}  // namespace

bool parseEntropyAttentionFields(PluginFieldCollection const* fc, float* scale, int32_t* normalize,
                                 int32_t* inBuffer, std::string* error) {
    if (fc == nullptr) return true;
    for (int32_t f = 0; f < fc->nbFields; ++f) {
        PluginField const& field = fc->fields[f];
        if (field.name == nullptr || field.data == nullptr) continue;
        if (std::strcmp(field.name, "scale") == 0) {
            if (field.length != 1) {
                *error = "field 'scale' must hold one value";
                return false;
            }
            if (field.type == PluginFieldType::kFLOAT32) {
                *scale = *static_cast<float const*>(field.data);
            } else if (field.type == PluginFieldType::kFLOAT64) {
                *scale = static_cast<float>(*static_cast<double const*>(field.data));
            } else {
                *error = "field 'scale' must be float32 or float64";
                return false;
            }
        } else if (std::strcmp(field.name, "normalize") == 0) {
            int64_t value = 0;
            if (field.length != 1) {
                *error = "field 'normalize' must hold one value";
                return false;
            }
            if (!readIntField(field, &value)) {
                *error = "field 'normalize' must be int32, int64 or int8";
                return false;
            }
            *normalize = static_cast<int32_t>(value != 0);
        } else if (std::strcmp(field.name, "in_buffer") == 0) {
            int64_t value = 0;
            if (!readIntField(field, &value)) {
                *error = "field 'in_buffer' must be one int32, int64 or int8 value";
                return false;
            }
            if (value != 0 && value != 1) {
                *error = "field 'in_buffer' must be 0 or 1";
                return false;
            }
            *inBuffer = static_cast<int32_t>(value);
        }
        // other fields (e.g. attributes a graph tool adds) are ignored
    }
    if (!std::isfinite(*scale)) {
        *error = "field 'scale' is not finite";
        return false;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------- plugin

EntropyAttentionPlugin::EntropyAttentionPlugin(float scale, int32_t normalize, int32_t inBuffer)
    : mScale(scale), mNormalize(normalize != 0 ? 1 : 0), mInBuffer(inBuffer != 0 ? 1 : 0) {
    mFields.emplace_back("scale", &mScale, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("normalize", &mNormalize, PluginFieldType::kINT32, 1);
    mFields.emplace_back("in_buffer", &mInBuffer, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* EntropyAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* EntropyAttentionPlugin::clone() noexcept {
    try {
        return new EntropyAttentionPlugin(mScale, mNormalize, mInBuffer);
    } catch (...) {
        return nullptr;
    }
}

char const* EntropyAttentionPlugin::getPluginName() const noexcept { return kEntropyAttentionName; }
char const* EntropyAttentionPlugin::getPluginVersion() const noexcept { return kEntropyAttentionVersion; }
char const* EntropyAttentionPlugin::getPluginNamespace() const noexcept { return kEntropyAttentionNamespace; }

int32_t EntropyAttentionPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

int32_t EntropyAttentionPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                                DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
        logError("expects 4 inputs (q, k, v, lengths) and 2 outputs (out, entropy)");
        return -1;
    }
    Dims const& q = in[0].desc.dims;
    Dims const& k = in[1].desc.dims;
    if (q.nbDims != 4 || k.nbDims != 4 || in[2].desc.dims.nbDims != 4 || in[3].desc.dims.nbDims != 1) {
        logError("q, k, v must be rank 4 [B,H,*,Dh] and lengths rank 1 [B]");
        return -1;
    }
    // -1 marks a dynamic axis; static sizes must agree
    if (q.d[3] > FASTARDIFF_MAX_HEAD_DIM) {
        logError("head dim above 256 is not supported by the kernel");
        return -1;
    }
    return 0;
}

int32_t EntropyAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                   DataType const* inputTypes, int32_t nbInputs) const noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || !isFloatType(inputTypes[0])) return -1;
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = inputTypes[0];
    return 0;
}

int32_t EntropyAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*,
                                                int32_t, DimsExprs* outputs, int32_t nbOutputs,
                                                IExprBuilder&) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[0].nbDims != 4) return -1;
    outputs[0] = inputs[0];  // out [B, H, K, Dh]
    outputs[1].nbDims = 3;   // entropy [B, H, K]
    for (int32_t d = 0; d < 3; ++d) outputs[1].d[d] = inputs[0].d[d];
    return 0;
}

bool EntropyAttentionPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                       int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    switch (pos) {
        case 0: return isFloatType(desc.type);                          // q decides the precision
        case 3: return desc.type == DataType::kINT32 || desc.type == DataType::kINT64;  // lengths
        default: return desc.type == inOut[0].desc.type;                // k, v, out, entropy follow q
    }
}

size_t EntropyAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t,
                                                DynamicPluginTensorDesc const*, int32_t) const noexcept {
    return 0;  // one pass, state in registers and shared memory
}

int32_t EntropyAttentionPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                                              int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    Dims const& q = in[0].dims;
    Dims const& k = in[1].dims;
    Dims const& v = in[2].dims;
    bool ok = q.nbDims == 4 && k.nbDims == 4 && v.nbDims == 4 && in[3].dims.nbDims == 1;
    ok = ok && k.d[0] == q.d[0] && k.d[1] == q.d[1] && k.d[3] == q.d[3];
    ok = ok && v.d[0] == k.d[0] && v.d[1] == k.d[1] && v.d[2] == k.d[2] && v.d[3] == k.d[3];
    ok = ok && in[3].dims.d[0] == q.d[0] && k.d[2] >= q.d[2];
    if (!ok) {
        logError("shapes must be q [B,H,K,Dh], k/v [B,H,T,Dh] with T >= K, lengths [B]");
        return -1;
    }
    return 0;
}

int32_t EntropyAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                        void const* const* inputs, void* const* outputs, void*,
                                        cudaStream_t stream) noexcept {
    (void)outputDesc;
    Dims const& q = inputDesc[0].dims;
    int64_t const batch = q.d[0], heads = q.d[1], numQ = q.d[2], headDim = q.d[3];
    int64_t const numK = inputDesc[1].dims.d[2];  // cache length + K (in_buffer: the buffer's capacity)
    float const scale = mScale > 0.0f ? mScale : 1.0f / std::sqrt(static_cast<float>(headDim));
    int const lengthsType = inputDesc[3].type == DataType::kINT64 ? FASTARDIFF_INT64 : FASTARDIFF_INT32;
    int const status = fastardiff_entropy_attention_launch(
        toKernelDtype(inputDesc[0].type), lengthsType, batch, heads, numQ, numK, headDim, scale, mNormalize,
        mInBuffer, inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], outputs[1],
        reinterpret_cast<fastardiff_stream_t>(stream));
    if (status != FASTARDIFF_OK) {
        logError(std::string("kernel launch failed: ") + fastardiff_status_string(status));
        return -1;
    }
    return 0;
}

IPluginV3* EntropyAttentionPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* EntropyAttentionPlugin::getFieldsToSerialize() noexcept {
    // pointers into this object; TensorRT copies them while serialising
    mFields[0] = PluginField("scale", &mScale, PluginFieldType::kFLOAT32, 1);
    mFields[1] = PluginField("normalize", &mNormalize, PluginFieldType::kINT32, 1);
    mFields[2] = PluginField("in_buffer", &mInBuffer, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------- creator

EntropyAttentionCreator::EntropyAttentionCreator() {
    mFieldNames.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back("normalize", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("in_buffer", nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* EntropyAttentionCreator::getPluginName() const noexcept { return kEntropyAttentionName; }
char const* EntropyAttentionCreator::getPluginVersion() const noexcept { return kEntropyAttentionVersion; }
char const* EntropyAttentionCreator::getPluginNamespace() const noexcept { return kEntropyAttentionNamespace; }
PluginFieldCollection const* EntropyAttentionCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* EntropyAttentionCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                                 TensorRTPhase) noexcept {
    float scale = 0.0f;      // <= 0: 1/sqrt(head_dim) at enqueue
    int32_t normalize = 1;
    int32_t inBuffer = 0;    // keys = [cache prefix, new tokens]
    std::string error;
    if (!parseEntropyAttentionFields(fc, &scale, &normalize, &inBuffer, &error)) {
        logError(std::string(name ? name : "<unnamed>") + ": " + error);
        return nullptr;
    }
    try {
        return new EntropyAttentionPlugin(scale, normalize, inBuffer);
    } catch (...) {
        return nullptr;
    }
}

}  // namespace fastardiff

extern "C" TENSORRTAPI IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static fastardiff::EntropyAttentionCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" TENSORRTAPI void setLoggerFinder(ILoggerFinder* finder) {
    std::lock_guard<std::mutex> lock(fastardiff::gLoggerMutex);
    if (fastardiff::gLoggerFinder == nullptr && finder != nullptr) fastardiff::gLoggerFinder = finder;
}
