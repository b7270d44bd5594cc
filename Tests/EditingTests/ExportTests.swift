import XCTest
import LanguageModel
import Storage
import TensorCore
@testable import Editing

/// A version's edits merged into the weights give the same model as the edits applied on the fly.
final class ExportTests: XCTestCase {
    func testExportedFolderEqualsEditedModel() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("export-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: root) }
        let folder = try ModelFolder.load(EditorTests.folder, requireTokenizer: true)
        var rng = RNG(seed: 9)
        let state = EditState(moduleNames: ["transformer.h.2.mlp.c_fc", "transformer.h.1.attn.c_attn"])
        state.modules["transformer.h.2.mlp.c_fc"]!.deltaWeight = Tensor.randn([64, 256], std: 0.05, rng: &rng)
        state.modules["transformer.h.2.mlp.c_fc"]!.deltaBias = Tensor.randn([256], std: 0.05, rng: &rng)
        state.modules["transformer.h.1.attn.c_attn"]!.deltaWeight = Tensor.randn([64, 192], std: 0.05, rng: &rng)
        let ids = [10, 20, 30, 40, 50]
        try EditedModelExport.install(state.tensors(), on: folder.model)
        let edited = folder.model.forward(TokenBatch(ids)).copy()
        let out = root.appendingPathComponent("exported")
        let provenance = EditedModelExport.Provenance(store: "/stores/demo", version: 7, stateSHA256: "ab12", baseModelSHA256: "cd34", dtype: .F32)
        try EditedModelExport.export(model: folder, state: state.tensors(), to: out, provenance: provenance)
        let written = try JSONDecoder().decode(EditedModelExport.Provenance.self,
                                               from: Data(contentsOf: out.appendingPathComponent(EditedModelExport.provenanceFile)))
        XCTAssertEqual(written, provenance, "the folder says which store, version and state it came from")
        let back = try ModelFolder.load(out, requireTokenizer: true)
        XCTAssertLessThan(back.model.forward(TokenBatch(ids)).maxAbsDifference(edited), 1e-4)
        XCTAssertNil(folder.model.linears["transformer.h.2.mlp.c_fc"]!.deltaWeight, "export leaves the model unedited")
        var bad = state.tensors()
        bad["delta_weight.transformer.h.9.mlp.c_fc"] = Tensor(shape: [1])
        XCTAssertThrowsError(try EditedModelExport.install(bad, on: folder.model))
    }
}
