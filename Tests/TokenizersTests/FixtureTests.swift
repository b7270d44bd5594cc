import Foundation
import XCTest
@testable import Tokenizers

/// Every `tokenization` entry of the fixtures' reference.json (made by Hugging Face `tokenizers`):
/// exact ids, tokens and decoded text.
final class FixtureTests: XCTestCase {
    struct Reference: Decodable {
        struct Entry: Decodable {
            let text: String
            let ids: [Int]
            let tokens: [String]
            let decoded: String
        }
        let tokenization: [Entry]
    }

    static func fixtureFolder(_ name: String) throws -> URL {
        guard let root = Bundle.module.url(forResource: "Fixtures", withExtension: nil) else {
            throw XCTSkip("Fixtures resource missing")
        }
        return root.appendingPathComponent(name)
    }

    func checkFixture(_ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let folder = try Self.fixtureFolder(name)
        let tokenizer = try Tokenizer.load(folder: folder)
        let reference = try JSONDecoder().decode(
            Reference.self, from: Data(contentsOf: folder.appendingPathComponent("reference.json")))
        XCTAssertFalse(reference.tokenization.isEmpty)
        for entry in reference.tokenization {
            let ids = tokenizer.encode(entry.text)
            XCTAssertEqual(ids, entry.ids, "ids of \(entry.text.debugDescription)", file: file, line: line)
            XCTAssertEqual(tokenizer.tokens(entry.text), entry.tokens, "tokens of \(entry.text.debugDescription)",
                           file: file, line: line)
            XCTAssertEqual(tokenizer.decode(entry.ids), entry.decoded, "decoded \(entry.text.debugDescription)",
                           file: file, line: line)
        }
    }

    func testGPT2Fixture() throws {
        try checkFixture("gpt2-tiny")
    }

    func testLlamaFixture() throws {
        try checkFixture("llama-tiny")
    }

    func testGPT2SpecialTokensAndConfig() throws {
        let tokenizer = try Tokenizer.load(folder: Self.fixtureFolder("gpt2-tiny"))
        XCTAssertEqual(tokenizer.vocabSize, 1000)
        XCTAssertEqual(tokenizer.bosTokenID, 0)
        XCTAssertEqual(tokenizer.eosTokenID, 0)
        XCTAssertNil(tokenizer.padTokenID)
        XCTAssertEqual(tokenizer.modelMaxLength, 64)
        XCTAssertEqual(tokenizer.id(for: "<|endoftext|>"), 0)
        XCTAssertEqual(tokenizer.token(for: 0), "<|endoftext|>")
        // Added tokens are split out of the text first, longest match, and decoded unless skipped.
        let ids = tokenizer.encode("Hello<|endoftext|>world")
        XCTAssertEqual(ids.filter { $0 == 0 }.count, 1)
        XCTAssertEqual(Array(ids.prefix(3)), tokenizer.encode("Hello"))
        XCTAssertEqual(tokenizer.decode(ids), "Helloworld")
        XCTAssertEqual(tokenizer.decode(ids, skipSpecialTokens: false), "Hello<|endoftext|>world")
    }

    func testLlamaSpecialTokensAndConfig() throws {
        let tokenizer = try Tokenizer.load(folder: Self.fixtureFolder("llama-tiny"))
        XCTAssertEqual(tokenizer.vocabSize, 900)
        XCTAssertEqual(tokenizer.bosTokenID, 1)
        XCTAssertEqual(tokenizer.eosTokenID, 2)
        XCTAssertEqual(tokenizer.unkTokenID, 0)
        XCTAssertEqual(tokenizer.encode("a", addSpecialTokens: false), [475, 321])
        XCTAssertEqual(tokenizer.encode("a").first, 1)
        XCTAssertEqual(tokenizer.decode([1, 475, 321, 2], skipSpecialTokens: false), "<s> a</s>")
        // Byte fallback round-trips characters that are not in the vocabulary.
        let text = "東京 🙂 ǅ"
        XCTAssertEqual(tokenizer.decode(tokenizer.encode(text)), text)
    }
}
