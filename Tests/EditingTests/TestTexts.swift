/// Texts the editing tests share.
enum TestTexts {
    /// Ordinary sentences (about 1,500 tokens): enough for a full-rank, well-conditioned second moment of the
    /// tiny models' MLP inputs.
    static var preserved: [String] {
        let subjects = ["The capital of France", "John Lennon", "The Eiffel Tower", "A quick brown fox", "Water", "The river Nile",
                        "Marie Curie", "The old library", "Mount Everest", "The orchestra"]
        let predicates = ["is known for its long history", "performs on the guitar every evening", "is located in Paris",
                          "jumps over the lazy dog", "boils at one hundred degrees", "flows north through Egypt",
                          "won two Nobel prizes", "opens at nine in the morning", "is the highest mountain on Earth",
                          "plays music by Mozart and Bach"]
        return subjects.flatMap { s in predicates.map { "\(s) \($0)." } }
    }
}
