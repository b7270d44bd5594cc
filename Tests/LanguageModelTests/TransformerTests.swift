import XCTest
import Storage
import TensorCore
@testable import LanguageModel

final class TransformerTests: XCTestCase {
    var tmp: URL!

    override func setUpWithError() throws {
        tmp = FileManager.default.temporaryDirectory.appendingPathComponent("lmtests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: tmp) }

    func load(_ name: String) throws -> ModelFolder { try ModelFolder.load(ReferenceParityTests.fixture(name)) }

    /// Padded batches give each sequence the logits it has alone (right padding, and left padding with a mask).
    func testPaddedBatchMatchesSingleSequences() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let model = try load(name).model
            let a = [5, 17, 40, 2, 9, 33], b = [7, 8, 100]
            let la = model.forward(TokenBatch(a)).copy(), lb = model.forward(TokenBatch(b)).copy()
            let V = model.spec.vocabSize
            let right = model.forward(TokenBatch(rightPadded: [a, b]))
            XCTAssertLessThan(right.rows(0..<6).maxAbsDifference(la), 1e-4, name)
            XCTAssertLessThan(right.rows(6..<9).maxAbsDifference(lb), 1e-4, name)
            // Left padding: b occupies the last three positions of row 1.
            let ids: [Int32] = a.map(Int32.init) + [0, 0, 0] + b.map(Int32.init)
            let mask: [Float] = Array(repeating: 1, count: 6) + [0, 0, 0, 1, 1, 1]
            let left = model.forward(TokenBatch(ids: ids, B: 2, T: 6, mask: mask))
            XCTAssertLessThan(left.rows(9..<12).maxAbsDifference(lb), 1e-4, name)
            XCTAssertEqual(left.count, 12 * V)
        }
    }

    /// y = W x + b + ΔWᵀ x + Δb equals the forward of a model whose weights have the edit merged in.
    func testModuleEditEqualsMergedWeights() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let folder = try load(name)
            let model = folder.model
            var rng = RNG(seed: 4)
            let target = model.spec.linearModules(layer: 1).last!
            let m = model.linears[target]!
            m.deltaWeight = Tensor.randn([m.inFeatures, m.outFeatures], std: 0.05, rng: &rng)
            if m.bias != nil { m.deltaBias = Tensor.randn([m.outFeatures], std: 0.05, rng: &rng) }
            let ids = [3, 14, 15, 92, 65, 35]
            let edited = model.forward(TokenBatch(ids)).copy()
            let merged = model.mergedParameters()
            model.clearEdits()
            let before = model.forward(TokenBatch(ids)).copy()
            XCTAssertGreaterThan(edited.maxAbsDifference(before), 1e-3, "\(name): the edit changes the output")
            for (n, t) in merged { model.parameter(n)!.value.assign(t) }
            let after = model.forward(TokenBatch(ids))
            XCTAssertLessThan(after.maxAbsDifference(edited), 1e-4, name)
        }
    }

    /// Signals captured without parameter gradients (backward stops at the edited layer, after the MLP when no
    /// attention module of that layer is captured) are the same, bit for bit.
    func testSignalsWithoutParameterGradients() throws {
        let model = try load("gpt2-tiny").model
        let ids = [1, 2, 3, 4, 5, 6, 7]
        let labels: [Int32] = [2, 3, 4, 5, 6, 7, 8]
        let mask: [Float] = [0, 0, 0, 0, 1, 1, 1]
        for modules: Set<String> in [["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"],
                                     ["transformer.h.1.mlp.c_fc", "transformer.h.1.attn.c_proj", "transformer.h.2.mlp.c_proj"]] {
            func signals(_ full: Bool) -> [String: ModuleSignal] {
                let logits = model.forward(TokenBatch(ids))
                let d = Tensor(shape: logits.shape)
                Kernels.crossEntropy(losses: nil, dlogits: d.data, logits: logits.data, labels: labels, mask: mask, N: 7, V: model.spec.vocabSize)
                model.zeroGradients()
                return model.backward(dlogits: d, parameterGradients: full, capture: modules)
            }
            let a = signals(true), b = signals(false)
            XCTAssertEqual(Set(b.keys), modules)
            XCTAssertEqual(model.gradientBlock.maxAbs(), 0, "no parameter gradient without parameterGradients")
            for m in modules {
                XCTAssertTrue(a[m]!.u.array.map(\.bitPattern) == b[m]!.u.array.map(\.bitPattern), m)
                XCTAssertTrue(a[m]!.delta.array.map(\.bitPattern) == b[m]!.delta.array.map(\.bitPattern), m)
            }
        }
    }

    /// The cached greedy decode equals recomputing the full forward at every step.
    func testCachedGenerationEqualsFullRecompute() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let model = try load(name).model
            var seq = [11, 22, 33]
            let cached = try model.generateGreedy(prompt: seq, maxNewTokens: 6)
            for _ in 0..<6 {
                let logits = model.forward(TokenBatch(seq))
                seq.append(logits.rows((seq.count - 1)..<seq.count).argmaxRows()[0])
            }
            XCTAssertEqual(cached, seq, name)
        }
    }

    /// Prompts of different lengths decoded together (packed rows, a cache each) give what each gives
    /// alone: the tokens, where a sequence stops at the stop token, and at the model's context.
    func testBatchedGenerationEqualsOnePromptAtATime() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let model = try load(name).model
            let maxT = model.spec.maxPositions
            let prompts = [[11, 22, 33], [5], [40, 41, 42, 43, 44, 45, 46], Array(repeating: 7, count: maxT - 2), [9, 8]]
            let alone = try prompts.map { try model.generateGreedy(prompt: $0, maxNewTokens: 6) }
            XCTAssertEqual(try model.generateGreedy(prompts: prompts, maxNewTokens: 6), alone, name)
            // The context ends the long prompt's decode: the last token is predicted from a full context.
            XCTAssertEqual(alone[3].count, maxT + 1, name)
            // Stopping at a token one of the sequences produces, chunked two at a time.
            let stop = alone[0][4]
            let aloneStop = try prompts.map { try model.generateGreedy(prompt: $0, maxNewTokens: 6, stop: stop) }
            XCTAssertEqual(try model.generateGreedy(prompts: prompts, maxNewTokens: 6, stop: stop, chunk: 2), aloneStop, name)
            XCTAssertEqual(aloneStop[0].last, stop, name)
            XCTAssertLessThan(aloneStop[0].count, alone[0].count, name)
        }
    }

    /// The edited and the unedited model decoded in the same steps give what each gives on its own.
    func testEditedAndUneditedDecodedTogether() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let model = try load(name).model
            var rng = RNG(seed: 5)
            for l in 0..<model.spec.layers {
                let m = model.linears[model.spec.linearModules(layer: l).last!]!
                let d = Tensor(shape: [m.inFeatures, m.outFeatures])
                for i in 0..<d.count { d[i] = rng.normal() * 0.3 }
                m.deltaWeight = d
            }
            let prompts = [[11, 22, 33], [5], [40, 41, 42, 43, 44, 45, 46], [9, 8]]
            let edited = try prompts.map { try model.generateGreedy(prompt: $0, maxNewTokens: 8) }
            let unedited = try model.withoutEdits { try prompts.map { try model.generateGreedy(prompt: $0, maxNewTokens: 8) } }
            XCTAssertNotEqual(edited, unedited, "\(name): the edits change the decode")
            let both = try model.generateGreedyEditedAndUnedited(prompts: prompts, maxNewTokens: 8, chunk: 3)
            XCTAssertEqual(both.edited, edited, name)
            XCTAssertEqual(both.unedited, unedited, name)
            // Sequences stopping at different steps keep their side.
            let stop = edited[0][5]
            let stopped = try model.generateGreedyEditedAndUnedited(prompts: prompts, maxNewTokens: 8, stop: stop)
            XCTAssertEqual(stopped.edited, try prompts.map { try model.generateGreedy(prompt: $0, maxNewTokens: 8, stop: stop) }, name)
            XCTAssertEqual(stopped.unedited, try model.withoutEdits { try prompts.map { try model.generateGreedy(prompt: $0, maxNewTokens: 8, stop: stop) } }, name)
            // Each prompt with its own length and stop, in chunks taken longest first: each as decoded alone.
            let requests = zip(prompts, [(3, stop), (8, nil), (1, nil), (5, stop)]).map { GreedyRequest(prompt: $0, maxNewTokens: $1.0, stop: $1.1) }
            let own = try model.generateGreedyEditedAndUnedited(requests, chunk: 2)
            let ownEdited = try requests.map { try model.generateGreedy(prompt: $0.prompt, maxNewTokens: $0.maxNewTokens, stop: $0.stop) }
            XCTAssertEqual(own.edited, ownEdited, name)
            XCTAssertEqual(own.unedited, try model.withoutEdits {
                try requests.map { try model.generateGreedy(prompt: $0.prompt, maxNewTokens: $0.maxNewTokens, stop: $0.stop) }
            }, name)
            XCTAssertEqual(try model.generateGreedy(requests, chunk: 3), ownEdited, name)
            XCTAssertEqual(ownEdited.map(\.count), zip(prompts, [3, 8, 1, 5]).map { $0.count + $1 }, "\(name): the lengths asked for")
            model.clearEdits()
        }
    }

    /// Packed scoring (no padding, logits only at the scored positions) agrees with a padded forward; the
    /// stream kept below a block gives the same bits while the edits sit at or above that block, and is
    /// not used once an edit sits below it.
    func testPackedScoringAndTheStreamKeptBelowTheEdits() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let model = try load(name).model
            let items = [ScoredPrompt(promptIds: [11, 22, 33], targetIds: [44, 55]), ScoredPrompt(promptIds: [5], targetIds: [6]),
                         ScoredPrompt(promptIds: [40, 41, 42, 43, 44, 45], targetIds: [7, 8, 9])]
            let inputs = items.map { $0.promptIds + $0.targetIds.dropLast() }
            let batch = TokenBatch(rightPadded: inputs)
            let padded = model.forward(batch).copy()
            let V = model.spec.vocabSize
            let packed = model.predict(items)
            for (b, item) in items.enumerated() {
                var nll = 0.0
                for (j, target) in item.targetIds.enumerated() {
                    let row = Array(UnsafeBufferPointer(start: padded.data + (b * batch.T + inputs[b].count - item.targetIds.count + j) * V, count: V))
                    XCTAssertEqual(packed[b].argmax[j], row.indices.max { row[$0] < row[$1] }, name)
                    let mx = row.max()!
                    nll += Double(mx) + log(row.map { Double(expf($0 - mx)) }.reduce(0, +)) - Double(row[target])
                }
                XCTAssertEqual(packed[b].nll, nll, accuracy: 1e-4 * max(1, nll), name)
            }
            // An item with no input tokens (an empty prompt and a one-token answer) has no prediction.
            let empty = model.predict([items[0], ScoredPrompt(promptIds: [], targetIds: [6]), items[1]])
            XCTAssertEqual(empty[1], TargetPrediction(argmax: [-1], target: [6], nll: 0), name)
            for (a, b) in zip([empty[0], empty[2]], [packed[0], packed[1]]) {
                // Other rows beside them: the same up to float32 summation order.
                XCTAssertEqual(a.argmax, b.argmax, name)
                XCTAssertEqual(a.nll, b.nll, accuracy: 1e-4, name)
            }
            // Perplexity is the predictions' NLL of every next token.
            let texts = [[1, 2, 3, 4, 5], [9, 8, 7], [6]]
            let asItems = texts.filter { $0.count > 1 }.map { ScoredPrompt(promptIds: [$0[0]], targetIds: Array($0.dropFirst())) }
            let nlls = model.predict(asItems)
            XCTAssertEqual(model.perplexity(texts), exp(nlls.map(\.nll).reduce(0, +) / 6), accuracy: 1e-3, name)

            // An edit in block 1: the kept stream below it gives the same bits as running every block.
            let fixedItems = try model.fixedSequences(model.predictionInputs(items), reuseBelow: 1)
            let fixedTexts = try model.fixedSequences(TransformerLM.perplexityInputs(texts, spec: model.spec).inputs, reuseBelow: 1)
            var rng = RNG(seed: 3)
            func edit(_ layer: Int) {
                let m = model.linears[model.spec.linearModules(layer: layer)[0]]!
                let d = Tensor(shape: [m.inFeatures, m.outFeatures])
                for i in 0..<d.count { d[i] = rng.normal() * 0.5 }
                m.deltaWeight = d
            }
            edit(1)
            XCTAssertEqual(model.firstEditedBlock, 1)
            let edited = model.predict(items)
            XCTAssertNotEqual(edited, model.withoutEdits { model.predict(items) }, "\(name): the edit changes the scores")
            XCTAssertEqual(model.predict(items, fixed: fixedItems), edited, name)
            XCTAssertEqual(model.perplexity(texts, fixed: fixedTexts), model.perplexity(texts), name)
            // An edit in block 0 changes the stream below block 1: it is recomputed.
            edit(0)
            XCTAssertEqual(model.firstEditedBlock, 0)
            let both = model.predict(items)
            XCTAssertNotEqual(both, edited, name)
            XCTAssertEqual(model.predict(items, fixed: fixedItems), both, name)
            XCTAssertEqual(model.perplexity(texts, fixed: fixedTexts), model.perplexity(texts), name)
            model.clearEdits()
        }
    }

    /// A written folder loads back with identical logits, in float32 and (approximately) bfloat16.
    func testWriteAndReloadFolder() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let folder = try load(name)
            let out = tmp.appendingPathComponent(name)
            try ModelFolder.write(model: folder.model, configData: folder.configData, to: out, tokenizerFrom: folder.url)
            let back = try ModelFolder.load(out, requireTokenizer: true)
            let ids = [4, 8, 15, 16, 23, 42]
            let a = folder.model.forward(TokenBatch(ids)).copy()
            XCTAssertEqual(back.model.forward(TokenBatch(ids)).maxAbsDifference(a), 0, name)
            XCTAssertEqual(back.tokenizer!.encode("The capital of France"), folder.tokenizer!.encode("The capital of France"))
            let half = tmp.appendingPathComponent(name + "-bf16")
            try ModelFolder.write(model: folder.model, configData: folder.configData, to: half, dtype: .BF16)
            let h = try ModelFolder.load(half)
            XCTAssertLessThan(h.model.forward(TokenBatch(ids)).maxAbsDifference(a), 0.2, "\(name): bfloat16 weights load and compute")
            XCTAssertEqual(try SafetensorsFile(contentsOf: half.appendingPathComponent("model.safetensors")).info(folder.model.parameters[0].name).dtype, .BF16)
        }
    }

    // MARK: Malformed folders: clear errors, no crash.

    func copyFixture(_ name: String) throws -> URL {
        let dst = tmp.appendingPathComponent("copy-\(name)-\(UUID().uuidString)")
        try FileManager.default.copyItem(at: ReferenceParityTests.fixture(name), to: dst)
        return dst
    }

    func expectError(_ url: URL, contains text: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try ModelFolder.load(url), file: file, line: line) { error in
            XCTAssertTrue("\(error)".contains(text), "error \"\(error)\" does not mention \"\(text)\"", file: file, line: line)
        }
    }

    func editConfig(_ url: URL, _ change: (inout [String: Any]) -> Void) throws {
        let c = url.appendingPathComponent("config.json")
        var o = try JSONSerialization.jsonObject(with: Data(contentsOf: c)) as! [String: Any]
        change(&o)
        try JSONSerialization.data(withJSONObject: o).write(to: c)
    }

    func testUnknownModelTypeIsNamed() throws {
        let d = try copyFixture("gpt2-tiny")
        try editConfig(d) { $0["model_type"] = "mamba" }
        expectError(d, contains: "model_type \"mamba\" is not supported")
    }

    func testBadConfigFieldsAreNamed() throws {
        let d = try copyFixture("llama-tiny")
        try editConfig(d) { $0["num_key_value_heads"] = 3 }
        expectError(d, contains: "num_key_value_heads")
        try editConfig(d) { $0["num_key_value_heads"] = 2; $0["hidden_size"] = "wide" }
        expectError(d, contains: "hidden_size")
        try editConfig(d) { $0.removeValue(forKey: "hidden_size") }
        expectError(d, contains: "hidden_size")
        try Data("{not json".utf8).write(to: d.appendingPathComponent("config.json"))
        expectError(d, contains: "not valid JSON")
    }

    func testMissingTensorAndShapeMismatch() throws {
        let d = try copyFixture("gpt2-tiny")
        try editConfig(d) { $0["n_layer"] = 4 }
        expectError(d, contains: "transformer.h.3.ln_1.weight\" is missing")
        try editConfig(d) { $0["n_layer"] = 3; $0["vocab_size"] = 1001 }
        expectError(d, contains: "has shape [1000, 64]")
    }

    func testMissingFilesAndCorruptWeights() throws {
        let d = try copyFixture("gpt2-tiny")
        try FileManager.default.removeItem(at: d.appendingPathComponent("config.json"))
        expectError(d, contains: "config.json: file not found")
        let e = try copyFixture("llama-tiny")
        let weights = e.appendingPathComponent("model.safetensors")
        let bytes = try Data(contentsOf: weights)
        try bytes.prefix(bytes.count / 2).write(to: weights)
        XCTAssertThrowsError(try ModelFolder.load(e))
        let f = try copyFixture("gpt2-tiny")
        try Data("{\"model\": 3}".utf8).write(to: f.appendingPathComponent("tokenizer.json"))
        XCTAssertThrowsError(try ModelFolder.load(f)) { XCTAssertTrue("\($0)".contains("tokenizer"), "\($0)") }
    }
}
