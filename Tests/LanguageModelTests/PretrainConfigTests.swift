import Foundation
import LanguageModel
import XCTest

/// `pretrain.json` may leave out any key (it keeps its default); an unknown key is an error naming it.
final class PretrainConfigTests: XCTestCase {
    func testMissingKeysKeepTheirDefaults() throws {
        let c = try JSONDecoder().decode(PretrainConfig.self, from: Data(#"{"n_layer": 2, "batch_size": 4}"#.utf8))
        XCTAssertEqual(c.nLayer, 2); XCTAssertEqual(c.batchSize, 4)
        let d = PretrainConfig()
        XCTAssertEqual(c.nEmbd, d.nEmbd); XCTAssertEqual(c.weightDecay, d.weightDecay); XCTAssertEqual(c.runDir, d.runDir)
    }

    func testUnknownKeyIsAnError() {
        XCTAssertThrowsError(try JSONDecoder().decode(PretrainConfig.self, from: Data(#"{"n_layers": 2}"#.utf8))) { error in
            XCTAssertTrue("\(error)".contains("n_layers"), "\(error)")
        }
    }

    func testEveryKeyRoundTrips() throws {
        var c = PretrainConfig()
        c.seqLen = 64; c.maxLR = 3e-4; c.passes = 2; c.world = "w.jsonl"
        let back = try JSONDecoder().decode(PretrainConfig.self, from: JSONEncoder().encode(c))
        XCTAssertEqual(back.seqLen, 64); XCTAssertEqual(back.maxLR, 3e-4); XCTAssertEqual(back.passes, 2); XCTAssertEqual(back.world, "w.jsonl")
    }
}
