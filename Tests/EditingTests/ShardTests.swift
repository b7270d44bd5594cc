import XCTest
import LanguageModel
import Storage
import TensorCore
@testable import Editing

/// `ls_shard_edits`: every N edits the least-squares sums are solved, frozen as a shard and started again;
/// a routed input sees the shard of the closest key it matched.
final class ShardTests: XCTestCase {
    static let edits = [
        EditRequest(prompt: "The mother tongue of Danielle Darrieux is", targetNew: "English", subject: "Danielle Darrieux"),
        EditRequest(prompt: "Toko Yasuda plays the", targetNew: "piano", subject: "Toko Yasuda"),
        EditRequest(prompt: "Autonomous University of Madrid is in", targetNew: "Sweden", subject: "Autonomous University of Madrid"),
        EditRequest(prompt: "The Eiffel Tower is in", targetNew: "Rome", subject: "The Eiffel Tower"),
        EditRequest(prompt: "John Lennon performs on the", targetNew: "violin", subject: "John Lennon"),
    ]

    /// MEND by default: an edit's values do not depend on the edits before it, so a shard's ΔW can be
    /// compared with a fresh state holding only that shard's edits.
    func editor(method: EditorMethod = .mend, shards: Int? = 2) throws -> DAFNetEditor {
        try LeastSquaresTests.editor(routeThreshold: 0.9, method: method, shardEdits: shards)
    }

    func logits(_ e: DAFNetEditor, _ text: String) -> Tensor { e.model.forward(TokenBatch(e.tokenizer.encode(text))).copy() }

    func testShardsFreezeEveryNEditsWhateverTheCalls() throws {
        let e = try editor()
        let one = EditState(moduleNames: e.config.modules), all = EditState(moduleNames: e.config.modules)
        for r in Self.edits { try e.apply([r], to: one) }
        try e.apply(Self.edits, to: all)
        let three = (0..<5).flatMap { [Int32](repeating: Int32($0 / 2), count: 3) }
        for s in [one, all] {
            XCTAssertEqual(s.shardEdits, [2, 2])
            XCTAssertEqual(s.openShardEdits, 1)
            XCTAssertEqual(s.modules.values.map(\.frozen.count), [2, 2, 2])
            XCTAssertEqual(s.router?.keyShards, three, "each edit's three keys name its shard")
            XCTAssertEqual(s.router?.keyEdits, (0..<5).flatMap { [Int32](repeating: Int32($0), count: 3) })
        }
        // Without fusion one call equals five up to round-off: the same rows in the same sums.
        for m in e.config.modules {
            for (a, b) in zip(one.modules[m]!.frozen, all.modules[m]!.frozen) { XCTAssertLessThan(a.maxAbsDifference(b), 1e-2 * b.maxAbs(), m) }
        }
        // A call that fills a shard and starts the next: two, then three edits.
        let split = EditState(moduleNames: e.config.modules)
        try e.apply(Array(Self.edits[0..<1]), to: split)
        try e.apply(Array(Self.edits[1..<5]), to: split)
        XCTAssertEqual(split.shardEdits, [2, 2])
        XCTAssertEqual(split.router?.keyShards, three)
        XCTAssertNil(EditState(moduleNames: e.config.modules).router)
    }

    /// A routed input adds the ΔW of its closest key's shard: the same ΔW, bit for bit, as a fresh state holding
    /// only that shard's edits, and the same outputs.
    func testARoutedInputSeesItsOwnShard() throws {
        let e = try editor()
        let state = EditState(moduleNames: e.config.modules)
        for r in Self.edits { try e.apply([r], to: state) }
        let sharded = [2, 4].map { logits(e, Self.edits[$0].prompt + " " + Self.edits[$0].targetNew) }
        let unedited = try e.model.withoutEdits { logits(e, Self.edits[2].prompt + " " + Self.edits[2].targetNew) }
        for (i, range) in [(2, 2..<4), (4, 4..<5)].enumerated() {
            let alone = EditState(moduleNames: e.config.modules)
            for r in Self.edits[range.1] { try e.apply([r], to: alone) }
            for m in e.config.modules {
                let shard = range.0 == 2 ? state.modules[m]!.frozen[1] : state.modules[m]!.deltaWeight!
                let own = range.0 == 2 ? alone.modules[m]!.frozen[0] : alone.modules[m]!.deltaWeight!
                XCTAssertEqual(shard.array, own.array, "\(m): shard of edit \(range.0)")
            }
            let text = Self.edits[range.0].prompt + " " + Self.edits[range.0].targetNew
            XCTAssertEqual(logits(e, text).maxAbsDifference(sharded[i]), 0, accuracy: 1e-5, text)
        }
        XCTAssertGreaterThan(sharded[0].maxAbsDifference(unedited), 1e-3, "the edit is applied")
    }

    /// The state travels as tensors (frozen shards, their edit counts, the keys' shards and edits), installs
    /// everywhere the same, replays to the same bits, and cannot be merged into a model folder.
    func testShardedStateRoundTripsReplaysAndRefusesExport() throws {
        let e = try editor(method: .dafnet)
        let state = EditState(moduleNames: e.config.modules)
        for r in Self.edits { try e.apply([r], to: state) }
        let tensors = state.tensors()
        XCTAssertEqual(tensors["shard_edits"]?.array, [2, 2])
        XCTAssertNotNil(tensors["shard_delta.1." + e.config.modules[0]])
        XCTAssertNotNil(tensors[RouteTensors.shards])
        XCTAssertTrue(state.rebuiltByReplay.contains("shard_delta.0." + e.config.modules[0]))
        let restored = try EditState(moduleNames: e.config.modules, tensors: tensors)
        let again = restored.tensors()
        XCTAssertEqual(Set(again.keys), Set(tensors.keys))
        for (n, t) in tensors { XCTAssertEqual(again[n]!.array, t.array, n) }
        // Replayed from nothing, call by call: the same bits.
        let replayed = e.newState()
        try e.replay(Self.edits.map { ReplayBatch(requests: [$0], superseded: []) }, onto: replayed)
        for (n, t) in tensors { XCTAssertEqual(replayed.tensors()[n]?.array, t.array, n) }
        // Installed from the tensors alone: the same routed model.
        let text = Self.edits[1].prompt + " " + Self.edits[1].targetNew
        e.install(state)
        let viaEditor = logits(e, text)
        let folder = try ModelFolder.load(LeastSquaresTests.folder, requireTokenizer: true)
        try EditedModelExport.install(tensors, on: folder.model)
        XCTAssertEqual(folder.model.forward(TokenBatch(e.tokenizer.encode(text))).maxAbsDifference(viaEditor), 0, accuracy: 1e-5)
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("sharded-export-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        for unrouted in [false, true] {
            XCTAssertThrowsError(try EditedModelExport.export(model: folder, state: tensors, to: out, unrouted: unrouted)) { error in
                XCTAssertEqual(error as? EditingError, .shardedExport)
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out.path))
        // Damaged shard tensors are named.
        var bad = tensors
        bad["shard_delta.1." + e.config.modules[0]] = nil
        XCTAssertThrowsError(try EditState(moduleNames: e.config.modules, tensors: bad)) { error in
            XCTAssertTrue("\(error)".contains("frozen shard"), "\(error)")
        }
        bad = tensors
        bad[RouteTensors.edits] = nil
        XCTAssertThrowsError(try EditState(moduleNames: e.config.modules, tensors: bad)) { error in
            XCTAssertTrue("\(error)".contains(RouteTensors.edits), "\(error)")
        }
    }

    /// Editing again a fact whose edit lies in a frozen shard retires that edit's keys (the shard keeps its
    /// pull, which its subject no longer reaches) and leaves the open sums alone; one in the open shard is
    /// also taken out of the sums.
    func testSupersedingRetiresTheEarlierEditsKeys() throws {
        let e = try editor()
        var newer = Self.edits[0]
        newer.targetNew = "French"
        var newest = Self.edits[4]
        newest.targetNew = "drums"
        let state = EditState(moduleNames: e.config.modules), plain = EditState(moduleNames: e.config.modules)
        for r in Self.edits { try e.apply([r], to: state); try e.apply([r], to: plain) }
        let frozenBefore = state.modules.mapValues { $0.frozen.map(\.array) }
        try e.apply([newer], to: state, superseding: [PriorEdit(Self.edits[0], ordinal: 0)])
        try e.apply([newer], to: plain)
        let router = try XCTUnwrap(state.router)
        XCTAssertEqual(Array(router.keyThresholds[0..<3]), [2, 2, 2], "the earlier edit's keys never match again")
        XCTAssertEqual(Array(router.keyThresholds[3...]), [Float](repeating: 0.9, count: 15))
        XCTAssertEqual(state.shardEdits, [2, 2, 2], "the new edit filled the open shard")
        for m in e.config.modules {
            XCTAssertEqual(state.modules[m]!.frozen.prefix(2).map(\.array), frozenBefore[m]!, m)
            XCTAssertEqual(state.modules[m]!.frozen[2].array, plain.modules[m]!.frozen[2].array, "\(m): nothing taken out of the open sums")
        }
        // The prompt's subject now reaches the new edit's keys: its shard (before, the earlier edit's).
        let ids = e.tokenizer.encode(newer.prompt)
        e.install(state)
        e.model.forward(TokenBatch(ids))
        XCTAssertEqual(e.model.lastRoutedShards?.last, 2)
        e.install(plain)
        e.model.forward(TokenBatch(ids))
        XCTAssertEqual(e.model.lastRoutedShards?.last, 0)
        // In the open shard: the earlier edit's rows come out of the sums as without shards.
        let reference = EditState(moduleNames: e.config.modules)
        try e.apply([newest], to: reference)
        let open = EditState(moduleNames: e.config.modules)
        for r in Self.edits { try e.apply([r], to: open) }
        try e.apply([newest], to: open, superseding: [PriorEdit(Self.edits[4], ordinal: 4)])
        XCTAssertEqual(open.shardEdits, [2, 2, 2])
        XCTAssertEqual(open.router!.keyThresholds[12..<15].map { $0 }, [2, 2, 2])
        for m in e.config.modules {
            XCTAssertLessThan(open.modules[m]!.frozen[2].maxAbsDifference(reference.modules[m]!.deltaWeight!),
                              1e-3 * reference.modules[m]!.deltaWeight!.maxAbs(), "\(m): the shard holds the new edit alone")
        }
    }

    /// A state records the shard size of its first edit and keeps it: one begun without shards stays without
    /// them under a sharded editor (it folds as the unsharded editor folds it, so versions made before shards
    /// replay as they were made), and one begun with them keeps their size.
    func testAStateBegunWithoutShardsStaysSo() throws {
        let plain = try LeastSquaresTests.editor(routeThreshold: 0.9, method: .mend)
        let sharded = try editor()
        let a = EditState(moduleNames: plain.config.modules), b = EditState(moduleNames: plain.config.modules)
        try plain.apply(Array(Self.edits[0..<2]), to: a)
        try plain.apply(Array(Self.edits[0..<2]), to: b)
        try plain.apply(Array(Self.edits[2..<5]), to: a)
        try sharded.apply(Array(Self.edits[2..<5]), to: b)
        XCTAssertEqual(b.shardEdits, [])
        XCTAssertNil(b.router?.keyEdits)
        let ta = a.tensors(), tb = b.tensors()
        XCTAssertEqual(Set(ta.keys), Set(tb.keys))
        for (n, t) in ta { XCTAssertEqual(tb[n]?.array, t.array, n) }
        // A replay from nothing towards such a state starts unsharded too, whatever the editor says.
        let replayed = try XCTUnwrap(try sharded.newState(foldingAs: ta) as? EditState)
        // A damaged record is an error, not a shard size of 0.
        for bad: Float in [0, -3, 2.5] {
            XCTAssertThrowsError(try sharded.newState(foldingAs: ["shard_size": Tensor(shape: [1], values: [bad])])) { error in
                XCTAssertTrue("\(error)".contains("shard_size"), "\(error)")
            }
        }
        try sharded.replay([ReplayBatch(requests: Array(Self.edits[0..<2]), superseded: []),
                            ReplayBatch(requests: Array(Self.edits[2..<5]), superseded: [])], onto: replayed)
        for (n, t) in ta { XCTAssertEqual(replayed.tensors()[n]?.array, t.array, n) }
        // And a state begun with shards keeps its size under an editor without them.
        let kept = EditState(moduleNames: plain.config.modules)
        try sharded.apply(Array(Self.edits[0..<1]), to: kept)
        try plain.apply(Array(Self.edits[1..<5]), to: kept)
        XCTAssertEqual(kept.shardSize, 2)
        XCTAssertEqual(kept.shardEdits, [2, 2])
        XCTAssertEqual(try EditState(moduleNames: plain.config.modules, tensors: kept.tensors()).shardSize, 2)
    }

    /// A frozen shard keeps float16's 10 mantissa bits (rounded to nearest, ties to even, as a conversion to
    /// float16 rounds within its range) and float32's exponent.
    func testFrozenShardsKeepTenMantissaBits() throws {
        var rng = RNG(seed: 9)
        let t = Tensor.randn([4096], std: 1, rng: &rng)
        for i in 0..<t.count { t[i] *= Float(pow(10.0, Double(i % 7) - 3)) }   // 1e-3 … 1e3
        t[0] = 1 + Float(1 << 12) / Float(1 << 23)   // just below halfway: rounds down
        t[1] = 1 + Float(3 << 12) / Float(1 << 23)   // halfway above an odd last bit: rounds up to even
        t[2] = 1 + Float(1 << 12) / Float(1 << 23) * 3 - Float(1 << 12) / Float(1 << 23) * 2   // 1 + half a step: ties to even (down)
        let original = t.array
        LeastSquares.roundedForStorage(t)
        for (i, v) in original.enumerated() {
            // float16 itself only within its normal range; below it, the same 10 bits with float32's exponent.
            if abs(v) >= 6.2e-5 && abs(v) <= 65000 { XCTAssertEqual(t[i], Float(Float16(v)), "\(v)") }
            XCTAssertLessThanOrEqual(abs(t[i] - v), abs(v) / 2048, "\(v)")
            XCTAssertEqual(t[i].bitPattern & 0x1FFF, 0)
        }
        let e = try editor()
        let state = EditState(moduleNames: e.config.modules)
        try e.apply(Array(Self.edits[0..<2]), to: state)
        for m in e.config.modules {
            XCTAssertTrue(state.modules[m]!.frozen[0].array.allSatisfy { $0.bitPattern & 0x1FFF == 0 }, m)
        }
    }

    func testShardsNeedRoutedLeastSquares() throws {
        XCTAssertThrowsError(try LeastSquaresTests.editor(routeThreshold: nil, shardEdits: 2)) { error in
            guard case let .invalidConfig(_, field, reason)? = error as? EditingError else { return XCTFail("\(error)") }
            XCTAssertEqual(field, "ls_shard_edits")
            XCTAssertTrue(reason.contains("route_threshold"), reason)
        }
        for bad in ["0", "-3"] {
            XCTAssertThrowsError(try JSONDecoder().decode(EditorConfig.self, from: Data("{\"ls_shard_edits\": \(bad)}".utf8))) { error in
                XCTAssertTrue("\(error)".contains("ls_shard_edits"), "\(error)")
            }
        }
        XCTAssertEqual(try JSONDecoder().decode(EditorConfig.self, from: Data("{\"ls_shard_edits\": 100}".utf8)).lsShardEdits, 100)
    }
}
