import Foundation
import XCTest
@testable import Tokenizers

/// Malformed or unsupported tokenizer files give typed errors naming the file and field; never a crash.
final class ErrorTests: XCTestCase {
    private func loadError(_ json: String, config: String? = nil) -> TokenizerError? {
        do {
            _ = try Tokenizer(tokenizerJSON: Data(json.utf8), tokenizerConfig: config.map { Data($0.utf8) })
            return nil
        } catch let error as TokenizerError {
            return error
        } catch {
            XCTFail("untyped error \(error)")
            return nil
        }
    }

    private func loadError(_ data: Data) -> TokenizerError? {
        loadError(String(decoding: data, as: UTF8.self))
    }

    private let model = #""model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}"#

    func testNotJSON() {
        guard case .malformedJSON(let file, _, _)? = loadError("this is not json") else { return XCTFail() }
        XCTAssertEqual(file, "tokenizer.json")
    }

    func testMissingModel() {
        XCTAssertEqual(loadError(#"{"added_tokens": []}"#), .missingField(file: "tokenizer.json", field: "model"))
    }

    func testMissingVocabularyAndMerges() {
        XCTAssertEqual(loadError(#"{"model": {"type": "BPE", "merges": []}}"#),
                       .missingField(file: "tokenizer.json", field: "model.vocab"))
        XCTAssertEqual(loadError(#"{"model": {"type": "BPE", "vocab": {}}}"#),
                       .missingField(file: "tokenizer.json", field: "model.merges"))
    }

    func testMergeWithUnknownToken() {
        let error = loadError(makeTokenizerJSON(vocab: ["a", "b", "ab"], merges: ["a b", "a c"]))
        guard case .invalidMerge(_, 1, let reason)? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(reason.contains("\"c\""), reason)
        let missingResult = loadError(makeTokenizerJSON(vocab: ["a", "b"], merges: ["a b"]))
        guard case .invalidMerge(_, 0, let reason2)? = missingResult else { return XCTFail() }
        XCTAssertTrue(reason2.contains("\"ab\""), reason2)
    }

    func testMalformedMerges() {
        guard case .malformedJSON(_, let field, _)? = loadError(makeTokenizerJSON(vocab: ["a", "b"], merges: ["a b c"])) else {
            return XCTFail()
        }
        XCTAssertEqual(field, "model.merges[0]")
        let json = #"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a"]]}}"#
        guard case .malformedJSON(_, let field2, _)? = loadError(json) else { return XCTFail() }
        XCTAssertEqual(field2, "model.merges[0]")
    }

    func testWrongTypes() {
        guard case .malformedJSON(_, let field, _)? = loadError(#"{"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}}"#) else {
            return XCTFail()
        }
        XCTAssertEqual(field, "model.vocab")
        guard case .malformedJSON(_, "model.vocab", _)? = loadError(#"{"model": {"type": "BPE", "vocab": [], "merges": []}}"#) else {
            return XCTFail()
        }
        guard case .malformedJSON(_, "added_tokens", _)? = loadError("{\"added_tokens\": 3, \(model)}") else { return XCTFail() }
        guard case .malformedJSON(_, "model.fuse_unk", _)? =
            loadError(#"{"model": {"type": "BPE", "fuse_unk": "yes", "vocab": {}, "merges": []}}"#) else { return XCTFail() }
        guard case .invalidVocabulary? = loadError(#"{"model": {"type": "BPE", "vocab": {"a": -1}, "merges": []}}"#) else {
            return XCTFail()
        }
        guard case .invalidVocabulary? = loadError(#"{"model": {"type": "BPE", "unk_token": "<unk>", "vocab": {"a": 0}, "merges": []}}"#) else {
            return XCTFail()
        }
    }

    func testUnsupportedStagesNameStageAndType() {
        XCTAssertEqual(loadError(#"{"model": {"type": "WordPiece", "vocab": {}}}"#),
                       .unsupported(file: "tokenizer.json", stage: "model", type: "WordPiece"))
        XCTAssertEqual(loadError("{\"normalizer\": {\"type\": \"Precompiled\"}, \(model)}"),
                       .unsupported(file: "tokenizer.json", stage: "normalizer", type: "Precompiled"))
        XCTAssertEqual(loadError("{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"BertNormalizer\"}]}, \(model)}"),
                       .unsupported(file: "tokenizer.json", stage: "normalizer", type: "BertNormalizer"))
        XCTAssertEqual(loadError("{\"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}, \(model)}"),
                       .unsupported(file: "tokenizer.json", stage: "pre_tokenizer", type: "BertPreTokenizer"))
        XCTAssertEqual(loadError("{\"post_processor\": {\"type\": \"Magic\"}, \(model)}"),
                       .unsupported(file: "tokenizer.json", stage: "post_processor", type: "Magic"))
        XCTAssertEqual(loadError("{\"decoder\": {\"type\": \"CTC\"}, \(model)}"),
                       .unsupported(file: "tokenizer.json", stage: "decoder", type: "CTC"))
        XCTAssertEqual(
            TokenizerError.unsupported(file: "t.json", stage: "decoder", type: "CTC").description,
            "t.json: unsupported decoder type \"CTC\"")
    }

    func testBadStageParameters() {
        guard case .malformedJSON(_, let field, _)? =
            loadError("{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, \"behavior\": \"Isolated\"}, \(model)}") else {
            return XCTFail()
        }
        XCTAssertEqual(field, "pre_tokenizer.pattern")
        guard case .malformedJSON? = loadError("{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \"-\"}, \"behavior\": \"Sideways\"}, \(model)}") else {
            return XCTFail()
        }
        let template = #"{"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}], "special_tokens": {}}"#
        guard case .malformedJSON(_, "post_processor.single[0]", _)? = loadError("{\"post_processor\": \(template), \(model)}") else {
            return XCTFail()
        }
    }

    func testBadTokenizerConfig() {
        let json = "{\(model)}"
        guard case .malformedJSON(let file, "model_max_length", _)? = loadError(json, config: #"{"model_max_length": "long"}"#) else {
            return XCTFail()
        }
        XCTAssertEqual(file, "tokenizer_config.json")
        guard case .malformedJSON(_, _, _)? = loadError(json, config: "{") else { return XCTFail() }
        // A token given as an object, and the "no limit" sentinel.
        let tokenizer = try? Tokenizer(tokenizerJSON: Data(json.utf8), tokenizerConfig: Data(
            #"{"bos_token": {"content": "a", "lstrip": false}, "eos_token": "ab", "model_max_length": 1e30}"#.utf8))
        XCTAssertEqual(tokenizer?.bosTokenID, 0)
        XCTAssertEqual(tokenizer?.eosTokenID, 2)
        XCTAssertNil(tokenizer?.modelMaxLength)
    }

    func testMissingFolder() {
        let folder = URL(fileURLWithPath: "/nonexistent-\(UUID().uuidString)")
        XCTAssertThrowsError(try Tokenizer.load(folder: folder)) { error in
            XCTAssertEqual(error as? TokenizerError, .fileNotFound(path: folder.appendingPathComponent("tokenizer.json").path))
        }
    }

    /// Every truncation of a real tokenizer.json fails with a typed error, never a crash.
    func testTruncatedFilesNeverCrash() throws {
        for name in ["gpt2-tiny", "llama-tiny"] {
            let data = try Data(contentsOf: FixtureTests.fixtureFolder(name).appendingPathComponent("tokenizer.json"))
            var rng = SplitMix64(seed: 3)
            var cuts = Array(stride(from: 0, to: data.count, by: max(1, data.count / 150)))
            cuts += (0..<50).map { _ in Int.random(in: 0..<data.count, using: &rng) }
            for cut in cuts {
                XCTAssertNotNil(loadError(data.prefix(cut)), "\(name) cut at \(cut)")
            }
            // Random byte corruption either loads or throws a TokenizerError.
            for _ in 0..<100 {
                var corrupted = [UInt8](data)
                for _ in 0..<4 { corrupted[Int.random(in: 0..<corrupted.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
                do {
                    let tokenizer = try Tokenizer(tokenizerJSON: Data(corrupted))
                    _ = tokenizer.decode(tokenizer.encode("The mother tongue of Danielle Darrieux is French"))
                } catch is TokenizerError {
                } catch {
                    XCTFail("untyped error \(error)")
                }
            }
        }
    }
}
