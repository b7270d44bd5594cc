import XCTest
import TensorCore
@testable import Editing

/// Compares the meta-gradient of one episode on `requests` — through the networks, the accumulation rule,
/// the edited model's losses and back — with central finite differences of the episode loss, for each
/// parameter at its largest-gradient entry (where the difference quotient is not float32 noise: the
/// episode loss is of order 10, so a gradient of 1e-3 is at the noise floor). Tolerance 5 % relative.
func checkMetaGradient(_ trainer: MetaTrainer, _ requests: [EditRequest], parameters: [Parameter],
                       file: StaticString = #filePath, line: UInt = #line) throws {
    func loss() throws -> Double { let l = try trainer.episode(requests, trainingNorm: false); return l.rel + l.gen + l.loc }
    for p in trainer.editor.trainableParameters { p.grad.zero() }
    _ = try loss()
    let checks: [(Parameter, Int)] = parameters.map { p in (p, (0..<p.grad.count).max { abs(p.grad[$0]) < abs(p.grad[$1]) }!) }
    // Read before any finite difference: every further episode adds to the gradients.
    let analyticValues = checks.map { Double($0.0.grad[$0.1]) }
    for ((p, i), analytic) in zip(checks, analyticValues) {
        let saved = p.value[i]
        let h = 1e-2 * max(abs(saved), 0.1)
        p.value[i] = saved + h; let lp = try loss()
        p.value[i] = saved - h; let lm = try loss()
        p.value[i] = saved
        let numeric = (lp - lm) / Double(2 * h)
        XCTAssertGreaterThan(abs(numeric), 1e-4, "\(p.name): the check needs a gradient above float noise", file: file, line: line)
        XCTAssertLessThan(abs(numeric - analytic) / max(abs(numeric), 1e-4), 0.05,
                          "\(p.name)[\(i)]: analytic \(analytic) numeric \(numeric)", file: file, line: line)
    }
}
