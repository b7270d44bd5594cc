import XCTest
import TensorCore
@testable import LanguageModel

/// Parity with Hugging Face transformers on the fixture folders (tolerances in the fixtures README).
final class ReferenceParityTests: XCTestCase {
    static func fixture(_ name: String) -> URL {
        Bundle.module.resourceURL!.appendingPathComponent("Fixtures").appendingPathComponent(name)
    }

    func checkFolder(_ name: String) throws {
        let report = try LanguageModelReference.check(folder: Self.fixture(name))
        XCTAssertGreaterThan(report.rows.count, 10)
        for row in report.rows where !row.passed {
            XCTFail("\(name): \(row.check) error \(row.error) > \(row.tolerance)")
        }
        // Every kind of check is present: tokenization, logits, loss, gradients, signals, greedy.
        for prefix in ["tokenization", "logits.", "edit.loss", "grad.", "signal.", "greedy"] {
            XCTAssertTrue(report.rows.contains { $0.check.hasPrefix(prefix) }, "\(name): no \(prefix) check")
        }
    }

    func testGPT2TinyMatchesTransformers() throws { try checkFolder("gpt2-tiny") }

    func testLlamaTinyMatchesTransformers() throws { try checkFolder("llama-tiny") }
}
