// Host-side checks of the TensorRT plugin object (runtime/plugin/entropy_attention_plugin.cpp) without a TensorRT
// runtime: the interfaces are pure virtual classes, so the plugin library links without libnvinfer and its creator,
// fields, shape/type/format logic and serialisation round trip can be called directly. enqueue() is called too: on
// a machine without a GPU it must fail cleanly (return non-zero), never crash.
// Built and run by tests/test_plugin_math.py. Prints one line per check; exit code = number of failures.
#include <cstdio>
#include <cstring>
#include <string>

#include <cuda_runtime_api.h>

#include "entropy_attention_plugin.h"

using namespace nvinfer1;

static int gFailures = 0;
#define CHECK(cond)                                                             \
    do {                                                                        \
        if (cond) {                                                             \
            std::printf("ok   %s\n", #cond);                                    \
        } else {                                                                \
            std::printf("FAIL %s (line %d)\n", #cond, __LINE__);                \
            ++gFailures;                                                        \
        }                                                                       \
    } while (0)

struct NullExprBuilder : IExprBuilder {};  // never dereferenced: the plugin only copies input expressions

static DynamicPluginTensorDesc desc(DataType type, TensorFormat format = TensorFormat::kLINEAR) {
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = format;
    return d;
}

static PluginTensorDesc tensor(DataType type, std::initializer_list<int64_t> dims) {
    PluginTensorDesc t{};
    t.type = type;
    t.format = TensorFormat::kLINEAR;
    t.dims.nbDims = static_cast<int32_t>(dims.size());
    int32_t i = 0;
    for (int64_t d : dims) t.dims.d[i++] = d;
    return t;
}

static fastardiff::EntropyAttentionPlugin* asPlugin(IPluginV3* p) {
    return dynamic_cast<fastardiff::EntropyAttentionPlugin*>(p);
}

int main() {
    int32_t n = -1;
    IPluginCreatorInterface* const* creators = getCreators(n);
    CHECK(n == 1 && creators != nullptr);
    auto* creator = dynamic_cast<IPluginCreatorV3One*>(creators[0]);
    CHECK(creator != nullptr);
    CHECK(std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    CHECK(std::strcmp(creator->getPluginName(), "EntropyAttention") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "fastardiff") == 0);
    PluginFieldCollection const* names = creator->getFieldNames();
    CHECK(names->nbFields == 3 && std::strcmp(names->fields[0].name, "scale") == 0 &&
          names->fields[0].type == PluginFieldType::kFLOAT32 && std::strcmp(names->fields[1].name, "normalize") == 0 &&
          names->fields[1].type == PluginFieldType::kINT32);
    CHECK(std::strcmp(names->fields[2].name, "in_buffer") == 0 && names->fields[2].type == PluginFieldType::kINT32 &&
          names->fields[2].length == 1);

    // fields as the ONNX parser passes them (float32 scale, int32 normalize)
    float scale = 0.25f;
    int32_t normalize = 0;
    PluginField fields[] = {PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1),
                            PluginField("normalize", &normalize, PluginFieldType::kINT32, 1)};
    PluginFieldCollection fc{2, fields};
    IPluginV3* plugin = creator->createPlugin("ea0", &fc, TensorRTPhase::kBUILD);
    CHECK(plugin != nullptr);
    CHECK(asPlugin(plugin)->scale() == 0.25f && asPlugin(plugin)->normalize() == 0 &&
          asPlugin(plugin)->inBuffer() == 0);
    // wider types are accepted too
    double scale64 = 0.5;
    int64_t normalize64 = 7;
    PluginField wide[] = {PluginField("scale", &scale64, PluginFieldType::kFLOAT64, 1),
                          PluginField("normalize", &normalize64, PluginFieldType::kINT64, 1)};
    PluginFieldCollection fcWide{2, wide};
    IPluginV3* pw = creator->createPlugin("ea1", &fcWide, TensorRTPhase::kBUILD);
    CHECK(pw != nullptr && asPlugin(pw)->scale() == 0.5f && asPlugin(pw)->normalize() == 1);
    // defaults: scale <= 0 (1/sqrt(Dh) at enqueue), normalize on
    PluginFieldCollection empty{0, nullptr};
    IPluginV3* pd = creator->createPlugin("ea2", &empty, TensorRTPhase::kRUNTIME);
    CHECK(pd != nullptr && asPlugin(pd)->scale() == 0.0f && asPlugin(pd)->normalize() == 1 &&
          asPlugin(pd)->inBuffer() == 0);
    // a field of an unusable type is refused
    char text[] = "x";
    PluginField bad[] = {PluginField("scale", text, PluginFieldType::kCHAR, 1)};
    PluginFieldCollection fcBad{1, bad};
    CHECK(creator->createPlugin("ea3", &fcBad, TensorRTPhase::kBUILD) == nullptr);

    // in_buffer: int32 / int64 / int8 0 or 1; another type, count or value is refused
    int32_t buf32[2] = {1, 1};
    int64_t buf64 = 1, buf64Zero = 0;
    int8_t buf8 = 1;
    float bufFloat = 1.0f;
    auto withBuffer = [&](char const* name, PluginField field) -> IPluginV3* {
        PluginField fs[] = {PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1), field};
        PluginFieldCollection c{2, fs};
        return creator->createPlugin(name, &c, TensorRTPhase::kBUILD);
    };
    IPluginV3* pb = withBuffer("eb0", PluginField("in_buffer", buf32, PluginFieldType::kINT32, 1));
    CHECK(pb != nullptr && asPlugin(pb)->inBuffer() == 1 && asPlugin(pb)->scale() == 0.25f);
    IPluginV3* pb64 = withBuffer("eb1", PluginField("in_buffer", &buf64, PluginFieldType::kINT64, 1));
    CHECK(pb64 != nullptr && asPlugin(pb64)->inBuffer() == 1);
    IPluginV3* pb64Zero = withBuffer("eb2", PluginField("in_buffer", &buf64Zero, PluginFieldType::kINT64, 1));
    CHECK(pb64Zero != nullptr && asPlugin(pb64Zero)->inBuffer() == 0);
    IPluginV3* pb8 = withBuffer("eb3", PluginField("in_buffer", &buf8, PluginFieldType::kINT8, 1));
    CHECK(pb8 != nullptr && asPlugin(pb8)->inBuffer() == 1);
    CHECK(withBuffer("eb4", PluginField("in_buffer", &bufFloat, PluginFieldType::kFLOAT32, 1)) == nullptr);
    CHECK(withBuffer("eb5", PluginField("in_buffer", buf32, PluginFieldType::kINT32, 2)) == nullptr);
    int32_t bufTwo = 2;
    CHECK(withBuffer("eb6", PluginField("in_buffer", &bufTwo, PluginFieldType::kINT32, 1)) == nullptr);

    // capabilities
    auto* core = dynamic_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = dynamic_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = dynamic_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    CHECK(core != nullptr && build != nullptr && runtime != nullptr);
    CHECK(std::strcmp(core->getPluginName(), "EntropyAttention") == 0 &&
          std::strcmp(core->getPluginNamespace(), "fastardiff") == 0 && std::strcmp(core->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(plugin->getInterfaceInfo().kind, "PLUGIN") == 0);

    // output types follow q
    CHECK(build->getNbOutputs() == 2);
    DataType outTypes[2];
    DataType inHalf[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kINT64};
    CHECK(build->getOutputDataTypes(outTypes, 2, inHalf, 4) == 0 && outTypes[0] == DataType::kHALF &&
          outTypes[1] == DataType::kHALF);
    DataType inInt[4] = {DataType::kINT32, DataType::kINT32, DataType::kINT32, DataType::kINT32};
    CHECK(build->getOutputDataTypes(outTypes, 2, inInt, 4) != 0);

    // output shapes: out = q's dims, entropy = q's first three
    IDimensionExpr const* fake[4] = {reinterpret_cast<IDimensionExpr const*>(0x10),
                                     reinterpret_cast<IDimensionExpr const*>(0x20),
                                     reinterpret_cast<IDimensionExpr const*>(0x30),
                                     reinterpret_cast<IDimensionExpr const*>(0x40)};
    DimsExprs in[4]{};
    for (auto& e : in) e.nbDims = 4;
    in[3].nbDims = 1;
    for (int d = 0; d < 4; ++d) in[0].d[d] = fake[d];
    DimsExprs out[2]{};
    NullExprBuilder builder;
    CHECK(build->getOutputShapes(in, 4, nullptr, 0, out, 2, builder) == 0);
    CHECK(out[0].nbDims == 4 && out[0].d[0] == fake[0] && out[0].d[3] == fake[3]);
    CHECK(out[1].nbDims == 3 && out[1].d[0] == fake[0] && out[1].d[1] == fake[1] && out[1].d[2] == fake[2]);

    // format combinations: linear only, q in fp32/fp16/bf16, k/v/out/entropy match q, lengths int32/int64
    DynamicPluginTensorDesc io[6] = {desc(DataType::kBF16), desc(DataType::kBF16), desc(DataType::kBF16),
                                     desc(DataType::kINT64), desc(DataType::kBF16), desc(DataType::kBF16)};
    bool all = true;
    for (int pos = 0; pos < 6; ++pos) all = all && build->supportsFormatCombination(pos, io, 4, 2);
    CHECK(all);
    io[3] = desc(DataType::kINT32);
    CHECK(build->supportsFormatCombination(3, io, 4, 2));
    io[3] = desc(DataType::kFLOAT);
    CHECK(!build->supportsFormatCombination(3, io, 4, 2));
    io[1] = desc(DataType::kFLOAT);
    CHECK(!build->supportsFormatCombination(1, io, 4, 2));
    io[0] = desc(DataType::kINT8);
    CHECK(!build->supportsFormatCombination(0, io, 4, 2));
    io[0] = desc(DataType::kHALF, TensorFormat::kHWC8);
    CHECK(!build->supportsFormatCombination(0, io, 4, 2));
    CHECK(!build->supportsFormatCombination(6, io, 4, 2));

    // runtime shapes
    PluginTensorDesc rt[4] = {tensor(DataType::kFLOAT, {2, 4, 5, 32}), tensor(DataType::kFLOAT, {2, 4, 69, 32}),
                              tensor(DataType::kFLOAT, {2, 4, 69, 32}), tensor(DataType::kINT64, {2})};
    PluginTensorDesc rtOut[2] = {tensor(DataType::kFLOAT, {2, 4, 5, 32}), tensor(DataType::kFLOAT, {2, 4, 5})};
    CHECK(runtime->onShapeChange(rt, 4, rtOut, 2) == 0);
    PluginTensorDesc rtBad[4] = {tensor(DataType::kFLOAT, {2, 4, 5, 32}), tensor(DataType::kFLOAT, {2, 4, 3, 32}),
                                 tensor(DataType::kFLOAT, {2, 4, 3, 32}), tensor(DataType::kINT64, {2})};
    CHECK(runtime->onShapeChange(rtBad, 4, rtOut, 2) != 0);

    // serialisation round trip through the creator, clone, attach
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    CHECK(ser->nbFields == 3 && std::strcmp(ser->fields[2].name, "in_buffer") == 0 &&
          ser->fields[2].type == PluginFieldType::kINT32 && *static_cast<int32_t const*>(ser->fields[2].data) == 0);
    IPluginV3* restored = creator->createPlugin("ea4", ser, TensorRTPhase::kRUNTIME);
    CHECK(restored != nullptr && asPlugin(restored)->scale() == 0.25f && asPlugin(restored)->normalize() == 0 &&
          asPlugin(restored)->inBuffer() == 0);
    auto* runtimeBuf = dynamic_cast<IPluginV3OneRuntime*>(pb->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* serBuf = runtimeBuf->getFieldsToSerialize();
    CHECK(serBuf->nbFields == 3 && std::strcmp(serBuf->fields[2].name, "in_buffer") == 0 &&
          *static_cast<int32_t const*>(serBuf->fields[2].data) == 1);
    IPluginV3* restoredBuf = creator->createPlugin("eb7", serBuf, TensorRTPhase::kRUNTIME);
    CHECK(restoredBuf != nullptr && asPlugin(restoredBuf)->inBuffer() == 1 &&
          asPlugin(restoredBuf)->scale() == 0.25f);
    IPluginV3* copyBuf = pb->clone();
    CHECK(copyBuf != nullptr && asPlugin(copyBuf)->inBuffer() == 1);
    IPluginV3* attachedBuf = runtimeBuf->attachToContext(nullptr);
    CHECK(attachedBuf != nullptr && asPlugin(attachedBuf)->inBuffer() == 1);
    IPluginV3* copy = plugin->clone();
    CHECK(copy != nullptr && copy != plugin && asPlugin(copy)->scale() == 0.25f);
    IPluginV3* attached = runtime->attachToContext(nullptr);
    CHECK(attached != nullptr && attached != plugin && asPlugin(attached)->normalize() == 0);

    // enqueue: without a GPU the launch must fail cleanly; with one, a single row with one key is exact
    int devices = 0;
    bool hasGpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
    if (!hasGpu) {
        float host[64] = {0};
        void const* inputs[4] = {host, host, host, host};
        void* outputs[2] = {host, host};
        CHECK(runtime->enqueue(rt, rtOut, inputs, outputs, nullptr, nullptr) != 0);
        CHECK(runtimeBuf->enqueue(rt, rtOut, inputs, outputs, nullptr, nullptr) != 0);
    } else {
        std::printf("skip enqueue-without-gpu check: a GPU is present (the CUDA kernel test covers enqueue)\n");
    }

    delete plugin;
    delete pw;
    delete pd;
    delete restored;
    delete copy;
    delete attached;
    for (IPluginV3* p : {pb, pb64, pb64Zero, pb8, restoredBuf, copyBuf, attachedBuf}) delete p;
    std::printf("%d failure(s)\n", gFailures);
    return gFailures;
}
