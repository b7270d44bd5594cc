/// An element of a `BinaryHeap`: `precedes` says which of two comes out first.
protocol HeapOrdered {
    func precedes(_ other: Self) -> Bool
}

/// A binary heap: `pop` returns the element that precedes all others.
struct BinaryHeap<Entry: HeapOrdered> {
    private var items: [Entry] = []

    var isEmpty: Bool { items.isEmpty }

    mutating func push(_ entry: Entry) {
        items.append(entry)
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child].precedes(items[parent]) else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> Entry? {
        guard let first = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var parent = 0
            let n = items.count
            while true {
                let left = 2 * parent + 1
                if left >= n { break }
                var best = left
                if left + 1 < n, items[left + 1].precedes(items[left]) { best = left + 1 }
                guard items[best].precedes(items[parent]) else { break }
                items.swapAt(best, parent)
                parent = best
            }
        }
        return first
    }
}
