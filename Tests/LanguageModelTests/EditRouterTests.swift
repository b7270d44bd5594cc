import XCTest
import TensorCore
@testable import LanguageModel

/// A routed model applies its edits from a sequence's first position near a key to the end of that
/// sequence, and nowhere else.
final class EditRouterTests: XCTestCase {
    /// A gpt2-tiny model with a random ΔW on block 1's MLP input projection, and the stream that module
    /// reads at each position of `ids` (unedited).
    func editedModel() throws -> (TransformerLM, String) {
        let model = try ModelFolder.load(ReferenceParityTests.fixture("gpt2-tiny")).model
        var rng = RNG(seed: 12)
        let name = model.spec.linearModules(layer: 1).first { $0.hasSuffix("mlp.c_fc") }!
        let m = model.linears[name]!
        m.deltaWeight = Tensor.randn([m.inFeatures, m.outFeatures], std: 0.2, rng: &rng)
        return (model, name)
    }

    func siteRows(_ model: TransformerLM, _ module: String, _ ids: [Int]) -> Tensor {
        model.withoutEdits { model.forward(TokenBatch(ids)); return model.lastInput(of: module)!.copy() }
    }

    func router(_ model: TransformerLM, keyRows: Tensor, threshold: Float) -> EditRouter {
        let C = model.spec.hidden
        var eye = [Float](repeating: 0, count: C * C)
        for i in 0..<C { eye[i * C + i] = 1 }
        let w = Tensor(shape: [C, C], values: eye)
        return EditRouter(layer: 1, site: .mlpInput, threshold: threshold, whitening: w,
                          keys: EditRouter.project(keyRows.data, N: keyRows.shape[0], whitening: w))
    }

    func testEditsStartAtTheFirstMatchAndStayOn() throws {
        let (model, module) = try editedModel()
        let a = [5, 17, 40, 2, 9, 33, 21], b = [7, 8, 100, 101, 3]
        let V = model.spec.vocabSize
        let unedited = model.withoutEdits { (model.forward(TokenBatch(a)).copy(), model.forward(TokenBatch(b)).copy()) }
        let edited = (model.forward(TokenBatch(a)).copy(), model.forward(TokenBatch(b)).copy())
        // The key: a's stream at position 3.
        let rows = siteRows(model, module, a)
        model.router = router(model, keyRows: rows.rows(3..<4), threshold: 0.999)
        let routed = model.forward(TokenBatch(rightPadded: [a, b]))
        let T = a.count
        XCTAssertEqual(routed.rows(0..<3).maxAbsDifference(unedited.0.rows(0..<3)), 0, accuracy: 1e-5, "before the match: unedited")
        // From the match on, the module adds ΔWᵀx to its output: the unedited model with that offset on those rows.
        let m = model.linears[module]!
        let offsets = Tensor(shape: [T - 3, m.outFeatures])
        BLAS.gemm(offsets.data, rows.data + 3 * m.inFeatures, m.deltaWeight!.data, M: T - 3, N: m.outFeatures, K: m.inFeatures)
        let saved = model.router
        model.router = nil
        m.outputOffsets = (Array(3..<T), offsets)
        let reference = model.withoutEdits { model.forward(TokenBatch(a)).copy() }
        m.outputOffsets = nil
        model.router = saved
        XCTAssertEqual(routed.rows(3..<T).maxAbsDifference(reference.rows(3..<T)), 0, accuracy: 1e-5, "from the match on: edited")
        XCTAssertGreaterThan(reference.rows(3..<T).maxAbsDifference(unedited.0.rows(3..<T)), 1e-3, "the edit changes those rows")
        XCTAssertEqual(routed.rows(T..<(T + b.count)).maxAbsDifference(unedited.1), 0, accuracy: 1e-5, "no match: unedited")
        XCTAssertEqual(routed.count, 2 * T * V)
        // No key near: nothing edited; a threshold every row passes: everything edited.
        model.router = router(model, keyRows: Tensor(shape: [0, model.spec.hidden]), threshold: 0.5)
        XCTAssertEqual(model.forward(TokenBatch(a)).maxAbsDifference(unedited.0), 0, accuracy: 1e-5)
        model.router = router(model, keyRows: rows.rows(3..<4), threshold: -1.01)
        XCTAssertEqual(model.forward(TokenBatch(a)).maxAbsDifference(edited.0), 0, accuracy: 1e-5)
        model.clearEdits()
        XCTAssertNil(model.router, "clearing the edits clears the router")
    }

    /// Each key is compared with its own threshold.
    func testEachKeyHasItsOwnThreshold() throws {
        let (model, module) = try editedModel()
        let a = [5, 17, 40, 2, 9, 33, 21], b = [7, 8, 100, 101, 3]
        let rowsA = siteRows(model, module, a), rowsB = siteRows(model, module, b)
        let keyRows = Tensor.concatenatingRows([rowsA.rows(3..<4), rowsB.rows(0..<1)])
        let base = router(model, keyRows: keyRows, threshold: 0.999)
        func matches(_ thresholds: [Float], _ rows: Tensor) -> [Bool] {
            EditRouter(layer: 1, site: .mlpInput, threshold: 0.999, whitening: base.whitening, keys: base.keys, keyThresholds: thresholds)
                .matches(rows.data, N: rows.shape[0])
        }
        XCTAssertEqual(base.keyThresholds, [0.999, 0.999])
        XCTAssertEqual(matches([0.999, 2], rowsA), [false, false, false, true, false, false, false])
        XCTAssertEqual(matches([0.999, 2], rowsB), [false, false, false, false, false], "the second key never matches")
        XCTAssertEqual(matches([2, 0.999], rowsA), [false, false, false, false, false, false, false])
        XCTAssertEqual(matches([2, 0.999], rowsB), [true, false, false, false, false])
    }

    /// The rows a router's site reads, from packed sequences through the blocks up to it, equal the full
    /// forward's inputs of the module there (edits installed or not: they are switched off).
    func testSiteRowsEqualTheFullForwardsInputs() throws {
        let (model, module) = try editedModel()
        let seqs = [[5, 17, 40, 2], [7, 8], [3, 14, 15, 92, 65]], positions = [2, 1, 4]
        let rows = try model.siteRows(seqs, at: positions, layer: 1, site: .mlpInput)
        for (i, (s, p)) in zip(seqs, positions).enumerated() {
            let full = siteRows(model, module, s)
            XCTAssertEqual(rows.rows(i..<(i + 1)).maxAbsDifference(full.rows(p..<(p + 1))), 0, accuracy: 1e-5)
        }
        let attn = try model.siteRows([seqs[0]], at: [3], layer: 1, site: .attentionInput)
        let qkv = model.spec.linearModules(layer: 1)[0]
        let full = model.withoutEdits { model.forward(TokenBatch(seqs[0])); return model.lastInput(of: qkv)!.copy() }
        XCTAssertEqual(attn.maxAbsDifference(full.rows(3..<4)), 0, accuracy: 1e-5)
    }

    /// Scoring fixed sequences on a routed model runs again only the chunks whose rows reach a key; the
    /// others take the unedited model's results kept from an earlier scoring. The whole equals scoring
    /// every chunk afresh, bit for bit, for perplexity and for predictions.
    func testFixedScoringRunsAgainOnlyTheChunksAKeyReaches() throws {
        let (model, module) = try editedModel()
        var rng = RNG(seed: 5)
        let texts = (0..<10).map { _ in (0..<(5 + rng.index(6))).map { _ in 1 + rng.index(model.spec.vocabSize - 1) } }
        let items = texts.map { ScoredPrompt(promptIds: Array($0.dropLast(2)), targetIds: Array($0.suffix(2))) }
        let textInputs = TransformerLM.perplexityInputs(texts, spec: model.spec).inputs
        func prepared() throws -> (FixedSequences, FixedSequences) {
            (try model.fixedSequences(textInputs, reuseBelow: 1, rowsPerChunk: 16),
             try model.fixedSequences(model.predictionInputs(items), reuseBelow: 1, rowsPerChunk: 16))
        }
        let (kept, keptItems) = try prepared()
        XCTAssertGreaterThan(kept.chunkCount, 3)
        // The unedited results, kept as they are computed (every chunk runs as the unedited model).
        let uneditedPPL = model.withoutEdits { model.perplexity(texts, fixed: kept) }
        let uneditedPredictions = model.withoutEdits { model.predict(items, fixed: keptItems) }
        // A key at a position of the fifth text: its chunk and no other is reached.
        model.router = router(model, keyRows: siteRows(model, module, texts[4]).rows(2..<3), threshold: 0.999)
        let reached = model.uneditedChunks(kept).filter { !$0 }.count
        XCTAssertEqual(reached, 1, "one chunk holds the keyed text")
        let fresh = try prepared()
        let ppl = model.perplexity(texts, fixed: kept), predictions = model.predict(items, fixed: keptItems)
        XCTAssertEqual(ppl, model.perplexity(texts, fixed: fresh.0))
        XCTAssertEqual(predictions, model.predict(items, fixed: fresh.1))
        XCTAssertNotEqual(ppl, uneditedPPL, "the keyed text is edited")
        XCTAssertNotEqual(predictions[4], uneditedPredictions[4])
        XCTAssertEqual(predictions[0], uneditedPredictions[0], "a text no key reaches: unedited")
        // The same inputs scored against other answers: the kept predictions (of the first answers) are not used.
        let others = items.map { ScoredPrompt(promptIds: $0.promptIds, targetIds: $0.targetIds.dropLast() + [($0.targetIds.last! + 1) % model.spec.vocabSize]) }
        XCTAssertEqual(model.predictionInputs(others), model.predictionInputs(items))
        let otherPredictions = model.predict(others, fixed: keptItems)
        XCTAssertEqual(otherPredictions, model.predict(others, fixed: try prepared().1))
        XCTAssertEqual(otherPredictions.map(\.target), others.map(\.targetIds))
        // Texts with the same inputs and other last tokens: the kept sums (of the first texts) are not used.
        let otherTexts = texts.map { Array($0.dropLast()) + [($0.last! + 1) % model.spec.vocabSize] }
        XCTAssertEqual(model.perplexity(otherTexts, fixed: kept), model.perplexity(otherTexts, fixed: try prepared().0))
        // Without a router every row sees the edit: no chunk is taken from the kept results.
        model.router = nil
        XCTAssertEqual(model.uneditedChunks(kept), [Bool](repeating: false, count: kept.chunkCount))
        XCTAssertEqual(model.perplexity(texts, fixed: kept), model.perplexity(texts, fixed: try prepared().0))
        XCTAssertNotEqual(model.perplexity(texts, fixed: kept), ppl)
    }

    /// Greedy decoding with a cache keeps a sequence's routing across steps: it equals recomputing the
    /// routed forward over the whole sequence at every step, and differs from the unrouted decode.
    func testCachedDecodeKeepsTheRoute() throws {
        let (model, module) = try editedModel()
        let prompt = [11, 22, 33, 44]
        let rows = siteRows(model, module, prompt)
        model.router = router(model, keyRows: rows.rows(1..<2), threshold: 0.999)
        let cached = try model.generateGreedy(prompts: [prompt, [60, 61]], maxNewTokens: 8)
        for (p, out) in zip([prompt, [60, 61]], cached) {
            var seq = p
            for _ in 0..<8 {
                let logits = model.forward(TokenBatch(seq))
                seq.append(logits.rows((seq.count - 1)..<seq.count).argmaxRows()[0])
            }
            XCTAssertEqual(out, seq)
        }
        let unedited = try model.withoutEdits { try model.generateGreedy(prompt: [60, 61], maxNewTokens: 8) }
        XCTAssertEqual(cached[1], unedited, "the sequence without a match decodes as the unedited model")
    }

    /// A router with the identity whitening and `keys` (unit rows) of shards `shards`.
    func shardedRouter(_ model: TransformerLM, keyRows: Tensor, threshold: Float, shards: [Int32]) -> EditRouter {
        let plain = router(model, keyRows: keyRows, threshold: threshold)
        return EditRouter(layer: 1, site: .mlpInput, threshold: threshold, whitening: plain.whitening, keys: plain.keys,
                          keyShards: shards, keyEdits: shards)
    }

    /// `closest` takes, among the keys a row is within the threshold of, the one of the highest cosine.
    func testClosestTakesTheNearestKeyWithinItsThreshold() {
        let C = 4
        let eye = Tensor(shape: [C, C], values: (0..<(C * C)).map { $0 % (C + 1) == 0 ? 1 : 0 })
        let keyRows = Tensor(shape: [3, C], values: [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0])
        let keys = EditRouter.project(keyRows.data, N: 3, whitening: eye)
        let r = EditRouter(layer: 0, site: .mlpInput, threshold: 0.5, whitening: eye, keys: keys, keyThresholds: [0.5, 0.5, 0.99],
                           keyShards: [0, 1, 2], keyEdits: [0, 1, 2])
        let rows = Tensor(shape: [3, C], values: [1, 0.1, 0, 0, 1, 0.9, 0, 0, 0, 0.3, 1, 0])
        let hits = r.closest(rows.data, N: 3)
        XCTAssertEqual(hits.map(\.shard), [0, 1, -1], "nearest key; the third row's only near key has a threshold above its cosine")
        XCTAssertEqual(hits[0].cosine, 1 / Float(1.01).squareRoot(), accuracy: 1e-6)
        XCTAssertEqual(r.matches(rows.data, N: 3), [true, true, false])
        XCTAssertEqual(r.shardCount, 3)
    }

    /// With shards, each routed row sees the shard of the closest key its sequence has matched so far (a
    /// closer key later moves it, a farther one does not), and adds that shard's ΔW: a frozen shard's, or
    /// the open one's for the shard after the frozen ones. The cached decode follows the same rule.
    func testRowsSeeTheShardOfTheClosestKeyMatchedSoFar() throws {
        let (model, module) = try editedModel()
        let m = model.linears[module]!
        var rng = RNG(seed: 5)
        let frozen = Tensor.randn([m.inFeatures, m.outFeatures], std: 0.2, rng: &rng)
        m.frozenDeltaWeights = [frozen]
        let a = [5, 17, 40, 2, 9, 33, 21]
        let rows = siteRows(model, module, a)
        let r = shardedRouter(model, keyRows: Tensor.concatenatingRows([rows.rows(1..<2), rows.rows(4..<5)]), threshold: 0.999,
                              shards: [1, 0])
        model.router = r
        let routed = model.forward(TokenBatch(a)).copy()
        // What the rule gives from the rows' own closest keys.
        var expected: [Int32] = [], state = RouteHit.none
        for hit in r.closest(rows.data, N: a.count) { state = state.continued(by: hit); expected.append(state.shard) }
        XCTAssertEqual(expected.prefix(4), [-1, 1, 1, 1])
        XCTAssertEqual(model.lastRoutedShards, expected)
        // Row by row, the module adds the ΔW of the row's shard: shard 0 is the frozen one, shard 1 the open one.
        let x = siteRows(model, module, a)
        let out = Tensor(shape: [a.count, m.outFeatures]), base = Tensor(shape: [a.count, m.outFeatures])
        m.forward(out.data, x.data, N: a.count, routed: expected)
        m.forward(base.data, x.data, N: a.count, routed: [Int32](repeating: -1, count: a.count))
        for (row, shard) in expected.enumerated() {
            let d = Tensor(shape: [1, m.outFeatures])
            if shard >= 0 {
                BLAS.gemm(d.data, x.data + row * m.inFeatures, (shard == 0 ? frozen : m.deltaWeight!).data, M: 1, N: m.outFeatures, K: m.inFeatures)
            }
            let got = out.rows(row..<(row + 1)), plain = base.rows(row..<(row + 1))
            plain.add(d)
            XCTAssertEqual(got.maxAbsDifference(plain), 0, accuracy: 1e-5, "row \(row) (shard \(shard))")
        }
        // Swapping the shards changes the output from the first match on.
        model.router = shardedRouter(model, keyRows: Tensor.concatenatingRows([rows.rows(1..<2), rows.rows(4..<5)]), threshold: 0.999,
                                     shards: [0, 1])
        let swapped = model.forward(TokenBatch(a)).copy()
        XCTAssertEqual(swapped.rows(0..<1).maxAbsDifference(routed.rows(0..<1)), 0, accuracy: 1e-6)
        XCTAssertGreaterThan(swapped.rows(1..<2).maxAbsDifference(routed.rows(1..<2)), 1e-3)
        // The cached decode equals the full forward at every step.
        model.router = r
        let prompts = [Array(a.prefix(3)), [60, 61]]
        let cached = try model.generateGreedy(prompts: prompts, maxNewTokens: 6)
        for (p, got) in zip(prompts, cached) {
            var seq = p
            for _ in 0..<6 {
                let logits = model.forward(TokenBatch(seq))
                seq.append(logits.rows((seq.count - 1)..<seq.count).argmaxRows()[0])
            }
            XCTAssertEqual(got, seq)
        }
    }

    /// The backward sends the edit's term only through routed rows: the gradient of the routed model's
    /// loss (all parameters) matches its finite difference along the gradient, and differs from the
    /// gradient with every row routed.
    func testBackwardFollowsTheRoute() throws {
        let (model, module) = try editedModel()
        let ids = [3, 14, 15, 92, 65, 35]
        let rows = siteRows(model, module, ids)
        let labels: [Int32] = [14, 15, 92, 65, 35, 8]
        let mask = [Float](repeating: 1, count: ids.count)
        func loss() -> Double {
            let logits = model.forward(TokenBatch(ids))
            let losses = Tensor(shape: [ids.count])
            Kernels.crossEntropy(losses: losses.data, dlogits: nil, logits: logits.data, labels: labels, mask: mask, N: ids.count, V: model.spec.vocabSize)
            return (0..<ids.count).reduce(0.0) { $0 + Double(losses[$1]) }
        }
        func gradient() -> Tensor {
            let logits = model.forward(TokenBatch(ids))
            let d = Tensor(shape: logits.shape)
            Kernels.crossEntropy(losses: nil, dlogits: d.data, logits: logits.data, labels: labels, mask: mask, N: ids.count, V: model.spec.vocabSize)
            model.zeroGradients()
            model.backward(dlogits: d, parameterGradients: true)
            return model.gradientBlock.copy()
        }
        model.router = router(model, keyRows: rows.rows(3..<4), threshold: -1.01)
        let everywhere = gradient()
        model.router = router(model, keyRows: rows.rows(3..<4), threshold: 0.99)
        let g = gradient()
        let norm = g.maxAbs()
        XCTAssertGreaterThan(g.maxAbsDifference(everywhere), 0.05 * norm, "the route changes the gradient")
        var sq = 0.0
        for i in 0..<g.count { sq += Double(g[i]) * Double(g[i]) }
        let length = sq.squareRoot()
        let theta = model.parameterBlock.copy()
        let h = 1e-3
        model.parameterBlock.assign(theta); model.parameterBlock.add(g, alpha: Float(h / length)); let up = loss()
        model.parameterBlock.assign(theta); model.parameterBlock.add(g, alpha: Float(-h / length)); let down = loss()
        model.parameterBlock.assign(theta)
        XCTAssertEqual((up - down) / (2 * h), length, accuracy: 0.02 * length)
    }
}
